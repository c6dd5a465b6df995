"""CloudWatch EMF lines from a real prefork worker: the pool children's counts of a task
that retries then parks reach the worker's standard output as valid EMF documents, with
the task, kind and queue as dimensions, each count once, on the flush timer and at
shutdown."""

from __future__ import annotations

import json

import pytest

from recovery.models import DeadLetter
from tests.recovery.emf_spec import emf_lines, totals

from . import worker_tasks as t
from .harness import wait_for

pytestmark = pytest.mark.integration

TASK = "tests.integration.worker_tasks.always_transient"


def env(interval: float) -> dict:
    return {"RECOVERY_TEST_METRICS_BACKENDS": json.dumps(["prometheus", "cloudwatch-emf"]),
            "RECOVERY_TEST_CLOUDWATCH": json.dumps({"FLUSH_INTERVAL_SECONDS": interval,
                                                    "NAMESPACE": "CeleryRecoveryIntegration"})}


def parked(task_id: str) -> bool:
    return DeadLetter.objects.filter(task_id=task_id).exists()


def test_a_task_that_retries_then_parks_is_in_the_workers_emf_lines(start_worker, key):
    # Given a prefork worker with two children, counting into CloudWatch every second
    worker = start_worker(env=env(1.0), concurrency=2)

    # When a task fails transiently four times (three retries), then is parked
    result = t.always_transient.delay(key)
    wait_for(lambda: parked(result.id), 60, message="the letter")

    # Then its counts appear in the worker's log as EMF lines, every one of them valid
    where = {"Task": TASK, "Kind": "timeout", "Queue": "celery"}

    def counted():
        documents = emf_lines(worker.log())
        return documents if totals(documents, "DeadLettersParked", **where) else None

    documents = wait_for(counted, 30, message="the parked letter's EMF line")
    assert totals(documents, "TaskFailures", **where) == 4
    assert totals(documents, "Retries", **where) == 3
    assert totals(documents, "DeadLettersParked", **where) == 1
    for document in documents:
        directive = document["_aws"]["CloudWatchMetrics"][0]
        assert directive["Namespace"] == "CeleryRecoveryIntegration"
        if "TaskFailures" in document:
            assert directive["Dimensions"] == [["Task", "Kind", "Queue"], ["Task"]]
            assert set(document) - {"_aws"} <= {"Task", "Kind", "Queue", "TaskFailures",
                                                "Retries", "DeadLettersParked"}
    # and the main process's heartbeats, by the worker's node name
    assert totals(documents, "WorkerHeartbeats", Worker="w1") >= 1

    # When the worker stops, nothing is published a second time
    worker.stop()
    documents = emf_lines(worker.log())
    assert totals(documents, "TaskFailures", **where) == 4
    assert totals(documents, "Retries", **where) == 3
    assert totals(documents, "DeadLettersParked", **where) == 1


def test_what_the_children_hold_is_published_when_the_worker_stops(start_worker, key):
    # Given a worker whose flush timer never fires during the test
    worker = start_worker(env=env(3600.0), concurrency=2)
    result = t.always_transient.delay(key)
    wait_for(lambda: parked(result.id), 60, message="the letter")
    assert totals(emf_lines(worker.log()), "TaskFailures", Task=TASK) == 0

    # When it shuts down (SIGTERM: warm shutdown, the children exit)
    worker.stop()

    # Then each child published its counts as it exited, and the main process its own
    documents = emf_lines(worker.log())
    where = {"Task": TASK, "Kind": "timeout", "Queue": "celery"}
    assert totals(documents, "TaskFailures", **where) == 4
    assert totals(documents, "Retries", **where) == 3
    assert totals(documents, "DeadLettersParked", **where) == 1
    assert totals(documents, "WorkerHeartbeats", Worker="w1") >= 1
