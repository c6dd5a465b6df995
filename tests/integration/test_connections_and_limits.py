"""Database connections in workers, and the hard time limit."""

from __future__ import annotations

import pytest
from django.db import connection

from recovery.models import DeadLetter

from . import worker_tasks as t
from .harness import wait_for
from ..brokers import broker_independent
from .test_retry_and_park import runs

pytestmark = pytest.mark.integration


def sessions_opened() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


def backend_pids_of_others() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        return [row[0] for row in cursor.fetchall()]


@broker_independent
def test_workers_reuse_database_connections(start_worker, store, key):
    # Given a running worker that has warmed up its connections
    start_worker(concurrency=2)
    t.add_one.delay(1).get(timeout=30)
    before = sessions_opened()
    # When it runs 200 tasks that each store a result in PostgreSQL
    results = [t.add_one.delay(i) for i in range(200)]
    assert [r.get(timeout=60) for r in results] == [i + 1 for i in range(200)]
    # Then it opened a handful of sessions, not one per task
    assert sessions_opened() - before <= 6


@broker_independent
def test_dropped_connection_does_not_lose_a_letter(start_worker, store, key):
    start_worker(concurrency=1)
    assert t.add_one.delay(1).get(timeout=30) == 2
    # When PostgreSQL terminates every worker connection (failover, restart, idle kill)
    with connection.cursor() as cursor:
        for pid in backend_pids_of_others():
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    # Then the next failure is still parked, on a fresh connection
    result = t.declined.delay(key, 5)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="letter after the connection was dropped")
    assert letter.attempts == 1
    assert t.add_one.delay(2).get(timeout=30) == 3


def test_hard_time_limit_is_redelivered_then_parked_as_timeout(start_worker, store, key):
    start_worker(concurrency=1)
    result = t.long_running.apply_async((key, 30), time_limit=2)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 90,
                      message="timeout letter")
    assert letter.kind == "timeout"
    assert "hard time limit" in letter.reason
    assert runs(store, key) == 3  # MAX_DELIVERIES in the test settings
