"""The lifecycle on real worker processes, a real Redis broker and real PostgreSQL."""

from __future__ import annotations

import pytest
from celery import states
from django_celery_results.models import TaskResult

from recovery.models import DeadLetter
from recovery.core.policy import RetryPolicy

from . import worker_tasks as t
from .harness import wait_for

pytestmark = pytest.mark.integration


def runs(store, key) -> int:
    return int(store.get(f"t:runs:{key}") or 0)


def times(store, key) -> list[float]:
    return [float(x) for x in store.lrange(f"t:times:{key}", 0, -1)]


def result_state(task_id: str) -> str | None:
    row = TaskResult.objects.filter(task_id=task_id).first()
    return row.status if row else None


def test_transient_twice_then_success_leaves_no_dead_letter(start_worker, store, key):
    # Given a worker and a task that fails transiently twice
    start_worker()
    # When it runs
    result = t.flaky_twice.delay(key)
    # Then it succeeds on the third run and nothing is parked
    assert result.get(timeout=30) == 3
    assert runs(store, key) == 3
    assert not DeadLetter.objects.exists()
    assert result_state(result.id) == states.SUCCESS


def test_permanent_failure_is_parked_after_one_attempt(start_worker, store, key):
    start_worker()
    result = t.declined.delay(key, 42)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="dead letter")
    assert runs(store, key) == 1
    assert letter.attempts == 1
    assert letter.kind == "dependency"
    assert letter.permanent is True
    assert letter.status == DeadLetter.Status.PARKED
    assert letter.exception_type == "recovery.errors.DependencyError"
    assert "card declined for order 42" in letter.exception_message
    assert "Traceback" in letter.traceback
    assert letter.args == [key, 42]
    assert letter.queue == "celery"
    assert len(letter.history) == 1 and letter.history[0]["delay_seconds"] is None
    # The Celery result stays FAILURE, written once with the letter.
    wait_for(lambda: result_state(result.id) == states.FAILURE, 10, message="FAILURE result")
    assert TaskResult.objects.filter(task_id=result.id).count() == 1


def test_always_transient_is_parked_once_after_max_attempts(start_worker, store, key):
    start_worker()
    result = t.always_transient.delay(key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 40,
                      message="dead letter")
    assert letter.attempts == 4
    assert runs(store, key) == 4
    assert DeadLetter.objects.count() == 1
    assert letter.kind == "timeout"
    assert "gave up after 4 attempts" in letter.reason
    delays = [entry["delay_seconds"] for entry in letter.history]
    assert delays[-1] is None
    # Each chosen delay fits the full-jitter envelope of the policy.
    policy = t.FOUR
    for retry_number, delay in enumerate(delays[:-1], start=1):
        ceiling = min(policy.max_delay_seconds,
                      policy.initial_delay_seconds * policy.multiplier ** (retry_number - 1))
        assert 0 <= delay <= ceiling + 1e-6
    # And the runs were actually spaced by at least those delays.
    run_times = times(store, key)
    for index, delay in enumerate(delays[:-1]):
        assert run_times[index + 1] - run_times[index] >= delay - 0.05
    wait_for(lambda: result_state(result.id) == states.FAILURE, 10, message="FAILURE result")


def test_retry_after_delays_the_next_attempt(start_worker, store, key):
    start_worker()
    result = t.rate_limited_once.delay(key)
    assert result.get(timeout=30) == 2
    first, second = times(store, key)
    assert second - first >= 2.0


def test_autoretry_for_goes_through_the_policy_not_max_retries(start_worker, store, key):
    # Celery's default max_retries (3) would stop after 4 runs; the policy allows 6.
    start_worker()
    result = t.autoretry_value_error.delay(key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="dead letter")
    assert runs(store, key) == 6
    assert letter.attempts == 6
    assert letter.exception_type == "ValueError"


def test_self_retry_goes_through_the_policy(start_worker, store, key):
    start_worker()
    result = t.explicit_self_retry.delay(key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="dead letter")
    assert runs(store, key) == 6
    assert letter.attempts == 6
    assert letter.exception_type == "RuntimeError"
    assert all(e["delay_seconds"] is None or e["delay_seconds"] >= 0.1 for e in letter.history)


def test_per_call_policy_header_overrides_the_task_policy(start_worker, store, key):
    from recovery import policy_header

    start_worker()
    result = t.always_transient.apply_async(
        (key,), headers=policy_header(RetryPolicy(max_attempts=2, initial_delay_seconds=0.1,
                                                  max_delay_seconds=0.1)))
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="dead letter")
    assert letter.attempts == 2
    assert runs(store, key) == 2


def test_task_without_policy_uses_the_default_and_plain_tasks_are_untouched(start_worker, store, key):
    start_worker()
    parked = t.uses_default_policy.delay(key)
    wait_for(lambda: DeadLetter.objects.filter(task_id=parked.id).exists(), 30, message="letter")
    plain_key = key + "-plain"
    plain = t.plain_fail.delay(plain_key)
    wait_for(lambda: result_state(plain.id) == states.FAILURE, 30, message="plain FAILURE")
    assert not DeadLetter.objects.filter(task_id=plain.id).exists()
