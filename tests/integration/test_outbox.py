"""The transactional outbox on real PostgreSQL, Redis and worker processes: a task
enqueued in a transaction runs once if it commits, never if it rolls back, and
still once when the broker was down at the commit."""

from __future__ import annotations

import threading

import pytest
from celery import Celery
from django.db import connection, transaction

from recovery.workflows import outbox
from recovery.models import OutboxMessage

from ..brokers import broker_address, queued, transport_options, unreachable, via
from . import worker_tasks as t
from .harness import TcpProxy, wait_for

pytestmark = pytest.mark.integration

TALLY = "tests.integration.worker_tasks.tally"


class Rollback(Exception):
    pass


def test_a_rolled_back_transaction_publishes_and_runs_nothing(start_worker, store, key):
    # Given a running worker
    start_worker()
    # When a task is enqueued in a transaction that then rolls back
    with pytest.raises(Rollback), transaction.atomic():
        outbox.enqueue(t.tally, (key, 1))
        raise Rollback
    # Then no intent is left, nothing reaches the broker, and the task never runs
    assert not OutboxMessage.objects.exists()
    t.tally.delay(key + "-probe", 0).get(timeout=15)  # the worker is alive and has drained
    assert store.get(f"t:runs:{key}") is None


def test_nothing_is_published_before_the_commit_and_it_runs_once_after(start_worker, store, key):
    # Given a worker
    start_worker()
    # When a task is enqueued inside a transaction
    with transaction.atomic():
        result = outbox.enqueue(t.tally, (key, 2))
        # Then, before the commit, the broker has nothing (the task cannot see uncommitted data)
        assert queued(store) == []
        assert OutboxMessage.objects.get().task_id == result.id
    # And after it, the task runs once under the id enqueue returned
    assert result.get(timeout=15) == 1
    row = OutboxMessage.objects.get(task_id=result.id)
    assert row.sent_at is not None and row.attempts == 1 and row.last_error == ""
    assert int(store.get(f"t:runs:{key}")) == 1


def test_broker_down_at_the_commit_then_published_once_it_is_back(start_worker, store, key,
                                                                   worker_env):
    # Given the web process and a worker that both reach the broker through a link that can fail
    proxy = TcpProxy(*broker_address())
    via_proxy = via(proxy.port)
    # (CELERY_BROKER_URL in the environment overrides a broker= argument; the write URL wins)
    web = Celery("web", set_as_current=False)
    web.conf.broker_write_url = via_proxy
    web.conf.broker_transport_options = transport_options(via_proxy)
    try:
        start_worker(env={"CELERY_BROKER_URL": via_proxy})
        # When the broker is unreachable at the moment the transaction commits
        proxy.cut()
        with transaction.atomic():
            result = outbox.enqueue(TALLY, (key, 3), app=web)
        # Then the commit succeeds, the intent is kept with the reason, and nothing ran
        row = OutboxMessage.objects.get(task_id=result.id)
        assert row.sent_at is None and row.attempts == 1
        assert "Error" in row.last_error
        # And when the broker is back, a worker's relay publishes it, and it runs once
        proxy.restore()
        wait_for(lambda: OutboxMessage.objects.get(task_id=result.id).sent_at is not None, 60,
                 message="relayed outbox row")
        wait_for(lambda: store.get(f"t:runs:{key}") is not None, 30, message="task run")
        t.tally.delay(key + "-probe", 0).get(timeout=30)  # let anything duplicated arrive
        assert int(store.get(f"t:runs:{key}")) == 1
    finally:
        proxy.close()


def test_concurrent_relays_publish_each_intent_once(broker, transactional_db):
    # Given 300 committed intents the fast path missed (the broker was unreachable)
    web_down = Celery("down", set_as_current=False)
    web_down.conf.broker_write_url = unreachable()
    with transaction.atomic():
        ids = [outbox.enqueue(TALLY, ("k", n), app=web_down).id for n in range(300)]
    OutboxMessage.objects.update(next_attempt_at=OutboxMessage.objects.first().created_at)
    assert outbox.pending_count() == 300
    # When three relays run at once against the real broker
    from config.celery import app

    sent: list[int] = []

    def run_relay():
        try:
            while True:
                n = outbox.relay(app, limit=50)
                sent.append(n)
                if n == 0:
                    break
        finally:
            connection.close()

    threads = [threading.Thread(target=run_relay) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then every intent was published exactly once
    published = [message["headers"]["id"] for message in queued(broker)]
    assert sorted(published) == sorted(ids)
    assert sum(sent) == 300 and outbox.pending_count() == 0


def test_countdown_survives_the_outbox(broker, transactional_db):
    with transaction.atomic():
        result = outbox.enqueue(TALLY, ("k", 1), countdown=60)
    [message] = queued(broker, delayed=True)
    assert message["headers"]["id"] == result.id
    assert message["headers"]["eta"] is not None
