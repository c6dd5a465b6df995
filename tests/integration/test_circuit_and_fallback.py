"""Circuit breaker, fallback and degraded mode on real worker processes, Redis (where the
circuit lives, shared by every worker) and PostgreSQL, against a local HTTP stand-in for a
partner's API whose failures the test controls.

The circuit "partner-api" is configured in tests/settings.py: it opens when at least half
of at least 4 calls in 30 s failed, stays open 3 s, then lets one trial call through.
"""

from __future__ import annotations

import time

import pytest
from celery import states
from django_celery_results.models import TaskResult

from recovery.workflows import degraded
from recovery.workflows.circuit import Circuit
from recovery.models import DeadLetter, FallbackUse

from . import worker_tasks as t
from .harness import StandIn, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def standin():
    server = StandIn()
    yield server
    server.close()


def runs(store, key) -> int:
    return int(store.get(f"t:runs:{key}") or 0)


def result_state(task_id: str) -> str | None:
    row = TaskResult.objects.filter(task_id=task_id).first()
    return row.status if row else None


def test_two_workers_share_one_circuit_that_stops_calls_tries_once_and_closes(
        start_worker, store, key, standin):
    # Given two worker processes and a partner API that answers 503
    start_worker("wa", concurrency=1)
    start_worker("wb", concurrency=1)
    standin.set("quote", "503")
    circuit = Circuit("partner-api")
    # When eight quotes are requested
    results = [t.partner_quote.delay(standin.url, key, f"S{n}") for n in range(8)]
    # Then the shared circuit opens once the threshold is crossed, counting both workers' calls
    wait_for(lambda: circuit.state()["state"] == "open", 20, message="the circuit to open")
    opened = circuit.state()
    assert opened["opened"] == 1
    assert {caller.split("@")[0] for caller in standin.callers()} == {"wa", "wb"}
    time.sleep(0.3)  # a call let through just before it opened has landed by now
    at_open = standin.count()
    assert at_open >= 4  # minimum_calls
    # And while it is open no worker calls the partner, and nothing is parked
    while time.time() < opened["open_until"] - 0.2:
        assert standin.count() == at_open
        time.sleep(0.1)
    assert not DeadLetter.objects.exists()
    # Then after open_seconds exactly one trial call reaches it (half-open); it fails, so the
    # circuit opens again
    wait_for(lambda: circuit.state().get("opened") == 2, 15, message="a failed trial")
    assert standin.count() == at_open + 1
    assert not DeadLetter.objects.exists()
    # When the partner recovers
    standin.set("quote", "healthy")
    # Then the next trial succeeds, the circuit closes, and every deferred quote completes
    values = [result.get(timeout=30) for result in results]
    assert circuit.state()["state"] == "closed"
    assert all(value["source"] == "partner" for value in values)
    assert not DeadLetter.objects.exists()
    # And attempts were spent only on calls that reached the partner: a deferral spends none
    assert runs(store, key) == standin.count()
    assert sum(value["attempts"] for value in values) == standin.count()
    assert sum(value["deliveries"] for value in values) > standin.count()


def test_an_open_circuit_routes_a_task_to_its_fallback(start_worker, key, standin):
    # Given a worker, and the partner's circuit opened by an operator
    start_worker()
    Circuit("partner-api").trip(seconds=30)
    # When a quote that falls back while the circuit is open is requested
    result = t.partner_quote_or_backup.delay(standin.url, key, "ACME")
    # Then the backup service's answer is the task's result, without calling the partner
    assert result.get(timeout=15) == {"symbol": "ACME", "price": 101.5, "source": "backup",
                                      "reason": "circuit_open"}
    assert standin.count("quote") == 0 and standin.count("backup") == 1
    assert result_state(result.id) == states.SUCCESS
    # And the degradation is recorded for operators
    use = FallbackUse.objects.get(task_id=result.id)
    assert use.reason == FallbackUse.Reason.CIRCUIT_OPEN
    assert use.dependency == "partner-api"
    assert use.task_name == t.partner_quote_or_backup.name
    assert use.fallback == "tests.integration.worker_tasks.backup_quote"
    assert use.exception_type == "recovery.circuit.CircuitOpenError"


def test_when_the_policy_gives_up_the_fallback_result_is_the_task_result(start_worker, store,
                                                                         key, standin):
    # Given a worker and a partner API that keeps answering 503
    start_worker()
    standin.set("quote", "503")
    # When a quote with a backup fallback is requested
    result = t.quote_with_backup.delay(standin.url, key, "ACME")
    # Then after its two attempts the backup's answer is the task's result
    assert result.get(timeout=20) == {"symbol": "ACME", "price": 101.5, "source": "backup",
                                      "reason": "gave_up"}
    assert runs(store, key) == 2 and standin.count("quote") == 2
    assert standin.count("backup") == 1
    assert result_state(result.id) == states.SUCCESS
    assert not DeadLetter.objects.exists()
    # And the degradation is recorded with the error that caused it
    use = FallbackUse.objects.get(task_id=result.id)
    assert use.reason == FallbackUse.Reason.GAVE_UP
    assert use.exception_type == "requests.exceptions.HTTPError"
    assert "503 Server Error" in use.exception_message


def test_when_the_fallback_fails_too_the_task_is_parked_with_both_errors(start_worker, store,
                                                                        key, standin):
    # Given a partner API answering 503 and a backup service answering 500
    start_worker()
    standin.set("quote", "503")
    standin.set("backup", "500")
    # When a quote with a backup fallback is requested
    result = t.quote_with_backup.delay(standin.url, key, "ACME")
    # Then it is parked once, and the letter names both failures
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 20,
                      message="dead letter")
    assert letter.attempts == 2 and runs(store, key) == 2
    assert "503 Server Error" in letter.exception_message
    assert "/quote/ACME" in letter.exception_message
    assert "The fallback tests.integration.worker_tasks.backup_quote failed too" in \
        letter.exception_message
    assert "500 Server Error" in letter.exception_message
    assert "/backup/ACME" in letter.exception_message
    assert letter.traceback.count("requests.exceptions.HTTPError") >= 2
    wait_for(lambda: result_state(result.id) == states.FAILURE, 10, message="FAILURE result")
    assert not FallbackUse.objects.exists()


def test_degraded_mode_defers_a_task_until_it_is_switched_off(start_worker, store, key,
                                                              standin):
    # Given a worker and read-only mode switched on by an operator
    start_worker()
    degraded.switch("read-only", True, actor="test", reason="database failover")
    # When a task that waits out read-only mode is sent
    result = t.report_or_defer.delay(standin.url, key, "2026-10")
    # Then it does not run (it is deferred, DEGRADED_DEFER_SECONDS = 1 in the test settings)
    time.sleep(2.5)
    assert runs(store, key) == 0 and standin.count() == 0
    assert result_state(result.id) != states.SUCCESS
    # When the operator switches read-only mode off
    degraded.switch("read-only", False, actor="test")
    # Then it runs, once, without having spent an attempt while it waited
    value = result.get(timeout=15)
    assert value["source"] == "partner" and value["attempts"] == 1
    assert value["deliveries"] >= 3  # the first delivery and at least two deferrals
    assert runs(store, key) == 1 and standin.count() == 1
    assert not FallbackUse.objects.exists()


def test_degraded_mode_routes_a_task_to_its_fallback(start_worker, key, standin):
    # Given a worker and read-only mode on
    start_worker()
    degraded.switch("read-only", True, actor="test", reason="database failover")
    # When a report that serves cached data in read-only mode is requested
    result = t.report_or_cache.delay(standin.url, key, "2026-10")
    # Then the cached report is the result, and the partner is not called
    assert result.get(timeout=15) == {"month": "2026-10", "source": "cache",
                                      "reason": "degraded"}
    assert standin.count() == 0
    use = FallbackUse.objects.get(task_id=result.id)
    assert use.reason == FallbackUse.Reason.DEGRADED and use.dependency == "read-only"
    # And with read-only mode off, the same task runs for real
    degraded.switch("read-only", False)
    live = t.report_or_cache.delay(standin.url, key, "2026-10").get(timeout=15)
    assert live["source"] == "partner" and standin.count() == 1
