"""Tasks the integration tests run on real worker processes.

They record what happened (runs, timestamps, pids) in Redis so the test
process can observe the workers from outside.
"""

from __future__ import annotations

import os
import signal
import time

import redis
from celery import Task, shared_task
from django.conf import settings
from django.db import connection, transaction

from recovery import RecoveryTask, RetryPolicy
from recovery.workflows.sagas import Saga, Step
from recovery.core.errors import (DataIntegrityError, DependencyError, ResourceExhaustedError, TimeoutOrDeadlockError, TransientError)

_client = None


def store() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.TEST_STORE_URL)
    return _client


def record_run(key: str) -> int:
    client = store()
    client.rpush(f"t:times:{key}", repr(time.time()))
    client.rpush(f"t:pids:{key}", os.getpid())
    return client.incr(f"t:runs:{key}")


QUICK = RetryPolicy(max_attempts=5, initial_delay_seconds=0.2, multiplier=2, max_delay_seconds=1)
FOUR = RetryPolicy(max_attempts=4, initial_delay_seconds=0.3, multiplier=2, max_delay_seconds=1.5,
                   jitter="full")


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def flaky_twice(self, key: str) -> int:
    runs = record_run(key)
    if runs <= 2:
        raise DependencyError(f"payments API answered 503 (run {runs})")
    return runs


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def declined(self, key: str, order_id: int) -> None:
    record_run(key)
    raise DependencyError(f"card declined for order {order_id}", permanent=True)


@shared_task(base=RecoveryTask, bind=True, retry_policy=FOUR)
def always_transient(self, key: str) -> None:
    runs = record_run(key)
    raise TimeoutOrDeadlockError(f"deadlock detected (run {runs})")


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def rate_limited_once(self, key: str) -> int:
    runs = record_run(key)
    if runs == 1:
        raise ResourceExhaustedError("HTTP 429 Too Many Requests", retry_after_seconds=2.0)
    return runs


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def sleepy_first_time(self, key: str, seconds: float) -> int:
    runs = record_run(key)
    if runs == 1:
        time.sleep(seconds)
    return runs


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def kills_its_worker(self, key: str) -> None:
    record_run(key)
    os.kill(os.getpid(), signal.SIGKILL)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def kills_its_worker_on_first_runs(self, key: str, killing_runs: int) -> int:
    """Kills its pool child on its first ``killing_runs`` runs (a crash loop whose cause is
    then fixed), succeeds afterwards."""
    runs = record_run(key)
    if runs <= killing_runs:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def long_running(self, key: str, seconds: float) -> int:
    runs = record_run(key)
    time.sleep(seconds)
    store().rpush(f"t:done:{key}", repr(time.time()))
    return runs


@shared_task(base=RecoveryTask, bind=True,
             retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=20,
                                      max_delay_seconds=20, jitter="none"))
def retry_in_twenty_seconds(self, key: str) -> int:
    runs = record_run(key)
    if runs == 1:
        raise TransientError("try again in a while")
    return runs


@shared_task(base=RecoveryTask, bind=True, autoretry_for=(ValueError,),
             retry_policy=RetryPolicy(max_attempts=6, initial_delay_seconds=0.1,
                                      max_delay_seconds=0.3))
def autoretry_value_error(self, key: str) -> None:
    runs = record_run(key)
    raise ValueError(f"bad value on run {runs}")


@shared_task(base=RecoveryTask, bind=True,
             retry_policy=RetryPolicy(max_attempts=6, initial_delay_seconds=0.1,
                                      max_delay_seconds=0.3))
def explicit_self_retry(self, key: str) -> None:
    runs = record_run(key)
    try:
        raise RuntimeError(f"upstream not ready (run {runs})")
    except RuntimeError as exc:
        raise self.retry(exc=exc, countdown=0.1)


@shared_task(base=RecoveryTask, bind=True)
def uses_default_policy(self, key: str) -> None:
    record_run(key)
    raise DataIntegrityError("invoice total does not match its lines")


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def add_one(self, x: int) -> int:
    return x + 1


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def times_ten_unless_broken(self, x: int, key: str) -> int:
    record_run(key)
    if not store().get(f"t:fixed:{key}"):
        raise DataIntegrityError(f"price list for {x} is corrupt")
    return x * 10


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def remember(self, x: int, key: str) -> int:
    store().set(f"t:result:{key}", x)
    return x


@shared_task(base=Task, bind=True)
def plain_fail(self, key: str) -> None:
    record_run(key)
    raise DependencyError("plain celery task failure")


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK,
             compensate="tests.integration.worker_tasks.release_seat")
def book_seat(self, key: str, seat: str) -> None:
    """Reserves a seat, then fails for good: the reservation must be undone."""
    store().sadd(f"t:reserved:{key}", seat)
    record_run(key)
    raise DependencyError(f"airline rejected booking of seat {seat}", permanent=True)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def release_seat(self, key: str, seat: str) -> str:
    """book_seat's compensation: records who asked (its idempotency key) and undoes it."""
    client = store()
    client.rpush(f"t:compensations:{key}",
                 f"{self.request.id}|{getattr(self.request, 'recovery_compensates', None)}")
    client.srem(f"t:reserved:{key}", seat)
    return seat


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def tally(self, key: str, order_id: int) -> int:
    """Counts its runs: the outbox tests check a committed task runs once, a rolled-back one never."""
    return record_run(key)


# -- circuit breaker, fallback, degraded mode (test_circuit_and_fallback.py) ----------------
# They call a local HTTP stand-in (harness.StandIn) with requests, as a task would call a
# partner's API; the circuit "partner-api" is configured in tests/settings.py.

PARTNER = RetryPolicy(max_attempts=8, initial_delay_seconds=0.2, multiplier=2,
                      max_delay_seconds=0.5)
GIVE_UP_FAST = RetryPolicy(max_attempts=2, initial_delay_seconds=0.1, max_delay_seconds=0.1)


def _get_json(url: str, worker: str = "") -> dict:
    import requests

    response = requests.get(url, timeout=3, headers={"X-Worker": worker or ""})
    response.raise_for_status()
    return response.json()


def backup_quote(base_url: str, key: str, symbol: str, failure: dict | None = None) -> dict:
    """The fallback: the partner's backup service, called with the same arguments and told
    why it stands in."""
    data = _get_json(f"{base_url}/backup/{symbol}")
    return {"symbol": symbol, "price": data["price"], "source": "backup",
            "reason": (failure or {}).get("reason")}


def _quote(task, base_url: str, key: str, symbol: str) -> dict:
    record_run(key)
    data = _get_json(f"{base_url}/quote/{symbol}", task.request.hostname)
    return {"symbol": symbol, "price": data["price"], "source": "partner",
            "attempts": len(task.attempt_history) + 1, "deliveries": task.request.retries + 1,
            "worker": task.request.hostname}


@shared_task(base=RecoveryTask, bind=True, retry_policy=PARTNER, dependency="partner-api")
def partner_quote(self, base_url: str, key: str, symbol: str) -> dict:
    """Behind the shared circuit; deferred while it is open."""
    return _quote(self, base_url, key, symbol)


@shared_task(base=RecoveryTask, bind=True, retry_policy=PARTNER, dependency="partner-api",
             when_circuit_open="fallback", fallback=backup_quote)
def partner_quote_or_backup(self, base_url: str, key: str, symbol: str) -> dict:
    """Behind the shared circuit; routed to the backup service while it is open."""
    return _quote(self, base_url, key, symbol)


@shared_task(base=RecoveryTask, bind=True, retry_policy=GIVE_UP_FAST, fallback=backup_quote)
def quote_with_backup(self, base_url: str, key: str, symbol: str) -> dict:
    """Falls back to the backup service when its policy gives up."""
    return _quote(self, base_url, key, symbol)


def cached_report(base_url: str, key: str, month: str, failure: dict | None = None) -> dict:
    return {"month": month, "source": "cache", "reason": (failure or {}).get("reason")}


@shared_task(base=RecoveryTask, bind=True, retry_policy=PARTNER, degraded_mode="read-only")
def report_or_defer(self, base_url: str, key: str, month: str) -> dict:
    """Waits while read-only mode is on."""
    return _quote(self, base_url, key, f"report-{month}")


@shared_task(base=RecoveryTask, bind=True, retry_policy=PARTNER, degraded_mode="read-only",
             when_degraded="fallback", fallback=cached_report)
def report_or_cache(self, base_url: str, key: str, month: str) -> dict:
    """Serves the cached report while read-only mode is on."""
    return _quote(self, base_url, key, f"report-{month}")


# -- bookkeeping after a body that returned (test_worker_failures.py, test_sagas.py) ------------


def wait_for_go(key: str, seconds: float = 60) -> None:
    """Tell the test the body is running, then wait until it says go (it cuts the database
    in between, so the writes after the body meet the fault)."""
    client = store()
    client.set(f"t:waiting:{key}", 1)
    deadline = time.time() + seconds
    while not client.get(f"t:go:{key}") and time.time() < deadline:
        time.sleep(0.05)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def charge_when_told(self, key: str, amount: int) -> dict:
    """A payment: its body must run once, whatever happens to the result store after it."""
    runs = record_run(key)
    connection.ensure_connection()  # a live connection, for the test to break
    wait_for_go(key)
    return {"charged": amount, "runs": runs}


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def returns_a_set(self, key: str) -> set:
    """Returns what the JSON result serializer cannot encode."""
    record_run(key)
    return {1, 2}


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK, dependency="partner-api")
def counted_on_partner_api(self, key: str) -> int:
    """Succeeds; the partner-api circuit counts it (its shared state may be down)."""
    return record_run(key)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def saga_first_leg(self, context: dict) -> dict:
    """Counts its runs, then waits for the test's go (which cuts the database first)."""
    key = context["key"]
    record_run(f"{key}:first")
    wait_for_go(key)
    return {"first": "done"}


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def saga_second_leg(self, context: dict) -> dict:
    record_run(f"{context['key']}:second")
    return {"second": "done", "saw_first": context.get("first")}


two_legs = Saga("two_legs", steps=[Step(saga_first_leg), Step(saga_second_leg)])


# -- effects that happen once (recovery.store.effects) ------------------------------------
#
# Both tasks write one row of `effect_probe` (the test creates the table), then report the
# window between their commit and the broker's acknowledgement, where a killed pool child
# makes the broker deliver the message again: the plain one writes its row again, the one
# behind self.effect skips it.

def _write_probe(probe: str, kind: str, i: int, task_id: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO effect_probe (probe, kind, i, task_id) VALUES (%s, %s, %s, %s)",
                       [probe, kind, i, task_id])


def _hold_after_commit(key: str, kind: str, i: int, hold: float) -> None:
    """Announce the window (committed, unacknowledged) and stay in it until the test has
    either SIGKILLed this child or released it, at most ``hold`` seconds: a kill that
    arrived after a fixed sleep could hit the child's next task instead."""
    entry = f"{kind}:{i}:{os.getpid()}"
    store().rpush(f"t:window:{key}", entry)
    store().incr(f"t:windows:{key}")
    store().blpop(f"t:release:{key}:{entry}", timeout=hold)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def writes_once(self, key: str, i: int, hold: float) -> int:
    with self.effect("probe") as first:
        if first:
            _write_probe(key, "once", i, self.request.id)
    _hold_after_commit(key, "once", i, hold)
    return i


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def writes_plain(self, key: str, i: int, hold: float) -> int:
    with transaction.atomic():
        _write_probe(key, "plain", i, self.request.id)
    _hold_after_commit(key, "plain", i, hold)
    return i


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def charges_then_fails(self, key: str, fail_after: bool) -> str:
    """An effect, then a failure: what a replay must not charge twice."""
    with self.effect("charge") as first:
        if first:
            _write_probe(key, "charge", 0, self.request.id)
    record_run(key)
    store().rpush(f"t:keys:{key}", self.idempotency_key("charge"))
    if fail_after and store().get(f"t:heal:{key}") is None:
        raise DataIntegrityError("the order's address is gone")
    return self.idempotency_key("charge")
