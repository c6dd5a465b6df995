"""The watchdog on real processes: a worker with two pool children, a real ``celery beat``
running ``recovery.observe.watchdog`` every second, Redis and PostgreSQL.

Tasks and the saga are in ``tests/integration/watchdog_tasks.py``; the workers' watchdog
settings arrive as JSON in ``RECOVERY_TEST_WATCHDOG`` (``tests/settings.py``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta

import pytest
from celery import current_app
from django.utils import timezone

from recovery.delivery import presence
from recovery.observe import watchdog
from recovery.models import (
    DeadLetter,
    DeadLetterEvent,
    Incident,
    OutboxMessage,
    SagaEvent,
    SagaRun,
    SagaStep,
)
from recovery.operations.replay import replay
from recovery.workflows import broker_waits

from ..brokers import BROKER, lose_queue, only_on
from . import watchdog_tasks
from .harness import wait_for

# Each sweep asks the workers what they run, hold and wait for (inspect().active(),
# scheduled(), query_task()): Celery's remote control needs a fanout exchange, which kombu's
# SQS transport does not implement, so on SQS no worker answers and the sweep decides
# nothing (docs/brokers.md).
pytestmark = [pytest.mark.integration,
              only_on("redis", "amqp", reason="the watchdog asks the workers over Celery's "
                      "remote control, which kombu's SQS transport does not carry (no fanout "
                      "exchange)")]

INCLUDE = ("-I", "tests.integration.worker_tasks,tests.integration.watchdog_tasks")
WATCHDOG = {"INTERVAL_SECONDS": 1, "SAGA_STEP_TIMEOUT_SECONDS": 2, "SAGA_STEP_MAX_REDISPATCHES": 2}
ENV = {"RECOVERY_TEST_WATCHDOG": json.dumps(WATCHDOG)}
HANG = watchdog_tasks.hang.name


def test_a_task_hanging_past_its_deadline_opens_one_incident_that_names_it(
        start_worker, start_beat, store, key):
    # Given a worker with two pool children, and beat running the watchdog every second
    worker = start_worker(env=ENV, extra=INCLUDE)
    beat = start_beat(ENV)
    # When a task whose deadline is 2 s hangs in one of the children
    result = watchdog_tasks.hang.apply_async((key,), {"api_token": "tok_live_do_not_show"})
    entry = wait_for(lambda: store.lindex(f"t:hang:{key}", 0), 10, message="the task to start")
    task_id, _pid, started = entry.decode().split()
    assert task_id == result.id

    # What the watchdog reads: Celery's Request.info()["time_start"] is a Unix time (the
    # worker's main process converts the pool's monotonic acceptance time), not monotonic.
    active = current_app.control.inspect(timeout=1).active()
    (info,) = [i for requests in active.values() for i in requests if i["id"] == result.id]
    assert abs(info["time_start"] - float(started)) < 1.0

    # Then, within 15 s, an incident names the task id, its worker and how long it ran
    def incident():
        return Incident.objects.filter(fingerprint=f"watchdog:task:{HANG}").first()
    found = wait_for(incident, 15, message="a stuck-task incident")
    seen_after = time.time() - float(started)
    assert found.reason == Incident.Reason.STUCK_TASK and found.status == Incident.Status.OPEN
    assert found.task_name == HANG
    assert found.details["task_ids"] == [result.id]
    (stuck,) = found.details["stuck"]
    assert stuck["worker"].startswith("w1@")
    assert stuck["deadline_seconds"] == 2
    assert stuck["started_at_estimated"] is False
    assert abs(datetime.fromisoformat(stuck["started_at"]).timestamp() - float(started)) < 1.0
    assert 2 < stuck["running_seconds"] <= seen_after + 1
    # ... with its secret argument masked
    assert "tok_live_do_not_show" not in json.dumps(found.details)
    assert "Sending due task recovery-watchdog (recovery.watchdog)" in beat.log()

    # And later sweeps add to the same incident instead of opening another
    wait_for(lambda: incident().count >= 2, 10, message="a second sweep to find it")
    assert Incident.objects.filter(fingerprint=f"watchdog:task:{HANG}").count() == 1
    # The watchdog killed nothing: the task is still running
    assert result.id in [i["id"] for requests in
                         current_app.control.inspect(timeout=1).active().values()
                         for i in requests]
    assert "recovery: 1 task of" in worker.log()

    # Finally the on-call ends it the way the runbook says: it ends revoked, not parked
    current_app.control.revoke(result.id, terminate=True, signal="SIGTERM")
    wait_for(lambda: result.state == "REVOKED", 10, message="the task to be revoked")
    assert result.id not in [i["id"] for requests in
                             (current_app.control.inspect(timeout=1).active() or {}).values()
                             for i in requests]
    assert not DeadLetter.objects.filter(task_id=result.id).exists()


def test_a_saga_step_whose_message_was_lost_is_dispatched_again_and_the_run_finishes(
        start_worker, start_beat, broker, key):
    # Given a run whose first step was published while no worker was up, and then lost
    run = watchdog_tasks.lost_message_saga.start(key=key)
    first = f"saga-{run.pk}-0-step"
    assert OutboxMessage.objects.get(task_id=first).sent_at is not None
    assert lose_queue(broker) == 1  # the broker lost the queue with the message
    # When a worker and beat (the watchdog every second, step timeout 2 s) come up
    start_worker(env=ENV, extra=INCLUDE)
    start_beat(ENV)

    # Then the watchdog dispatches the step again under a new task id, and the run finishes
    def finished():
        run.refresh_from_db()
        return run.status == SagaRun.Status.SUCCEEDED
    wait_for(finished, 20, message=f"run {run.pk} to succeed")
    step = SagaStep.objects.get(run=run, index=0, role="step")
    assert (step.task_id, step.dispatches, step.status) == (f"{first}.2", 2, "succeeded")
    assert run.context["one"] == f"{first}.2"
    event = SagaEvent.objects.get(run=run, action=SagaEvent.Action.REDISPATCHED)
    assert event.actor == "watchdog"
    assert event.outcome.startswith(f"step 0 ({watchdog_tasks.lost_step_one.name}) dispatched "
                                    f"again as {first}.2")
    # Each step ran once; nothing was escalated
    assert [line.decode() for line in broker.lrange(f"t:lost:{key}", 0, -1)] == [
        f"one {first}.2", f"two saga-{run.pk}-1-step"]
    assert not Incident.objects.exists()


# -- what the workers hold: countdown retries, and workers that do not answer ---------------

# Retries up to 30 s (the default BROKER_DELAY_MAX_SECONDS) wait in the worker's memory.
IN_MEMORY = {**ENV, "RECOVERY_BROKER_DELAY_MAX_SECONDS": "30"}


def _scheduled_ids() -> set[str]:
    replies = current_app.control.inspect(timeout=1).scheduled() or {}
    return {entry["request"]["id"] for entries in replies.values() for entry in entries}


def _retry_waits(task_id: str) -> bool:
    """The task's short retry waits: in the worker's memory (Redis), or in RabbitMQ's
    delayed-delivery queues, where only its note says so (recovery.workflows.broker_waits)."""
    if BROKER == "amqp":
        return task_id in broker_waits.waiting([task_id])
    return task_id in _scheduled_ids()


def _watchdog_here(settings, **values) -> None:
    """The watchdog settings of the sweeps this test runs in its own process."""
    settings.RECOVERY = {**settings.RECOVERY, "WATCHDOG": {**WATCHDOG, **values}}


def test_a_replay_waiting_for_its_countdown_retry_is_not_taken_for_lost(
        start_worker, settings, store, key):
    # Given a worker whose short retries wait in its memory, and a parked letter
    start_worker(env=IN_MEMORY, extra=INCLUDE)
    _watchdog_here(settings, REPLAYING_AFTER_SECONDS=1)
    result = watchdog_tasks.declined_then_flaky.delay(key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id, status="parked").first(),
                      30, message="the letter to be parked")
    # When its replay fails once and waits 12 s for its retry (an ETA in the worker's
    # memory), and a sweep runs meanwhile, the letter replaying for longer than the limit
    replay(letter, actor="alice")
    wait_for(lambda: _retry_waits(result.id), 20, message="the replay's retry to wait")
    report = watchdog.sweep(now=timezone.now() + timedelta(seconds=2))
    # Then the sweep does not take it for lost
    assert report.lost_replays == 0 and not report.failed_checks, report
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.REPLAYING
    # And the retry runs, succeeds and resolves the letter, which was replayed once
    wait_for(lambda: DeadLetter.objects.filter(pk=letter.pk, status="resolved").exists(), 30,
             message="the letter to be resolved")
    assert int(store.get(f"t:flaky:{key}")) == 3
    assert not DeadLetterEvent.objects.filter(letter=letter, action="replay_lost").exists()
    assert not Incident.objects.exists()


def test_a_saga_step_waiting_for_its_countdown_retry_is_not_dispatched_again(
        start_worker, settings, store, key):
    # Given a worker whose short retries wait in its memory
    start_worker(env=IN_MEMORY, extra=INCLUDE)
    _watchdog_here(settings)
    # When a step (timeout 2 s) fails once and waits 12 s for its retry, and a sweep runs
    # past the step's timeout
    run = watchdog_tasks.retrying_step_saga.start(key=key)
    step_id = f"saga-{run.pk}-0-step"
    wait_for(lambda: _retry_waits(step_id), 20, message="the step's retry to wait")
    report = watchdog.sweep(now=timezone.now() + timedelta(seconds=3))
    # Then the step is not dispatched again
    assert report.redispatched_steps == 0 and not report.failed_checks, report
    # And the retry finishes the run, under the step's first and only dispatch

    def finished():
        run.refresh_from_db()
        return run.status == SagaRun.Status.SUCCEEDED
    wait_for(finished, 30, message=f"run {run.pk} to succeed")
    step = SagaStep.objects.get(run=run, index=0, role="step")
    assert (step.task_id, step.dispatches) == (step_id, 1)
    assert int(store.get(f"t:step:{key}")) == 2
    assert not SagaEvent.objects.filter(run=run, action=SagaEvent.Action.REDISPATCHED).exists()


def test_a_sweep_decides_nothing_while_a_live_worker_does_not_answer(start_worker, settings,
                                                                     caplog, key):
    # Given two workers, both stamped alive, and a letter replaying for longer than the
    # limit whose message no worker holds
    workers = {name: start_worker(name, env=ENV, extra=INCLUDE) for name in ("a", "b")}
    wait_for(lambda: len(presence.alive()) == 2, 10, message="both workers to be stamped alive")
    _watchdog_here(settings, REPLAYING_AFTER_SECONDS=1)
    letter = DeadLetter.objects.create(task_id=f"lost-{key}", task_name=HANG, status="replaying",
                                       fingerprint="f" * 40, replay_count=1)
    # When worker b's main process is stopped (alive, but silent) during a sweep
    os.kill(workers["b"].process.pid, signal.SIGSTOP)
    try:
        report = watchdog.sweep(now=timezone.now() + timedelta(seconds=2))
    finally:
        os.kill(workers["b"].process.pid, signal.SIGCONT)
    # Then the sweep takes nothing for lost, and says why
    assert report.lost_replays == 0
    assert "replaying" in report.failed_checks
    assert "1 live worker did not answer" in report.undecided and "b@" in report.undecided
    assert f"took nothing for lost: {report.undecided}" in caplog.text
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.REPLAYING
    # And once b answers again, the next sweep finds the replay lost
    report = watchdog.sweep(now=timezone.now() + timedelta(seconds=2))
    assert (report.lost_replays, report.undecided) == (1, "")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED
    # A worker stopped cleanly is no longer expected to answer
    workers["a"].stop()
    assert [name.split("@")[0] for name in presence.alive()] == ["b"]
