"""Deferred bookkeeping writes (recovery.store.deferred): spooled while the database was down,
applied by the spool drain, idempotent, never over a newer state. Real PostgreSQL and the
project's django-db result backend; the worker-side path is in
tests/integration/test_worker_failures.py and test_sagas.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from celery import states
from celery.app.task import Context
from django.conf import settings
from django_celery_results.models import TaskResult

from config.celery import app
from recovery.store import deferred
from recovery.models import DeadLetter
from recovery.store.parking import drain_spool

pytestmark = pytest.mark.django_db


def spool_files(suffix: str = ".json") -> list[Path]:
    directory = Path(settings.RECOVERY["SPOOL_DIR"])
    return sorted(directory.glob(f"*{suffix}")) if directory.is_dir() else []


def test_a_deferred_success_result_is_stored_by_the_drain_with_its_task_name():
    deferred.defer_result(app.backend, "paid-1", {"charged": 42}, request=Context(
        task="billing.charge", args=[1], kwargs={}, hostname="w1@host"))
    record = json.loads(spool_files()[0].read_text())
    assert record["type"] == "result"

    assert drain_spool(backend=app.backend) == 1

    row = TaskResult.objects.get(task_id="paid-1")
    assert row.status == states.SUCCESS
    assert json.loads(row.result) == {"charged": 42}
    assert row.task_name == "billing.charge"
    assert spool_files() == []


def test_a_deferred_result_applied_twice_changes_nothing_the_second_time():
    deferred.defer_result(app.backend, "paid-2", 5)
    record = json.loads(spool_files()[0].read_text())
    drain_spool(backend=app.backend)
    first = TaskResult.objects.get(task_id="paid-2").date_done

    deferred.apply(record, app.backend)  # a second worker drained the same file

    assert TaskResult.objects.get(task_id="paid-2").date_done == first


def test_a_deferred_result_never_overwrites_a_newer_state_of_the_task():
    deferred.defer_result(app.backend, "paid-3", "ok")
    time.sleep(0.01)
    # The task ran again meanwhile (a redelivery, a replay) and failed
    app.backend.store_result("paid-3", ValueError("card expired"), states.FAILURE)

    drain_spool(backend=app.backend)

    assert TaskResult.objects.get(task_id="paid-3").status == states.FAILURE
    assert spool_files() == []


def test_a_deferred_replay_resolution_resolves_the_letter_once_the_database_is_back():
    letter = DeadLetter.objects.create(task_id="replayed-1", task_name="t",
                                       status=DeadLetter.Status.REPLAYING)
    deferred.defer(deferred.REPLAY_SUCCEEDED, task_id="replayed-1")

    assert drain_spool() == 1

    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RESOLVED


def test_a_deferred_write_of_an_unknown_type_is_set_aside_not_retried_forever():
    deferred.defer("no-such-write", task_id="x")
    deferred.defer_result(app.backend, "paid-4", 1)

    drain_spool(backend=app.backend)

    assert len(spool_files(".bad")) == 1
    assert TaskResult.objects.get(task_id="paid-4").status == states.SUCCESS


def test_a_letter_has_no_type_and_is_not_a_deferred_write():
    assert not deferred.is_deferred({"task_id": "t", "kind": "poison"})
    assert deferred.is_deferred({"type": "result"})
