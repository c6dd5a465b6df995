"""Tasks and a saga the watchdog tests run on real worker processes
(``tests/integration/test_watchdog.py``; workers include this module with ``-I``)."""

from __future__ import annotations

import os
import time

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy
from recovery.core.errors import DependencyError, TransientError
from recovery.workflows.sagas import Saga, Step

from .worker_tasks import store


@shared_task(base=RecoveryTask, bind=True, deadline_seconds=2)
def hang(self, key: str, seconds: float = 60, api_token: str = "") -> None:
    """Hangs (a call that never answers), past its 2 s deadline."""
    store().rpush(f"t:hang:{key}", f"{self.request.id} {os.getpid()} {time.time()!r}")
    time.sleep(seconds)


@shared_task(base=RecoveryTask, bind=True)
def lost_step_one(self, context: dict) -> dict:
    store().rpush(f"t:lost:{context['key']}", f"one {self.request.id}")
    return {"one": self.request.id}


@shared_task(base=RecoveryTask, bind=True)
def lost_step_two(self, context: dict) -> dict:
    store().rpush(f"t:lost:{context['key']}", f"two {self.request.id}")
    return {"two": self.request.id}


lost_message_saga = Saga("watchdog_lost_message", steps=[
    Step(lost_step_one, timeout_seconds=2),
    Step(lost_step_two, timeout_seconds=2),
])


#: One retry, 12 s later: with BROKER_DELAY_MAX_SECONDS at 30 (its default) it waits as a
#: countdown message in the worker's memory, where only ``inspect().scheduled()`` sees it.
RETRY_IN_TWELVE = RetryPolicy(max_attempts=3, initial_delay_seconds=12, max_delay_seconds=12,
                              jitter="none")


@shared_task(base=RecoveryTask, bind=True, retry_policy=RETRY_IN_TWELVE)
def declined_then_flaky(self, key: str) -> int:
    """Parked on its first run; its replay times out once and waits for its retry, which
    succeeds."""
    runs = store().incr(f"t:flaky:{key}")
    if runs == 1:
        raise DependencyError("card declined", permanent=True)
    if runs == 2:
        raise TransientError("payment gateway timed out")
    return runs


@shared_task(base=RecoveryTask, bind=True, retry_policy=RETRY_IN_TWELVE)
def slow_retry_step(self, context: dict) -> dict:
    """Times out once, then waits 12 s for its retry (past its 2 s step timeout)."""
    runs = store().incr(f"t:step:{context['key']}")
    if runs == 1:
        raise TransientError("inventory service timed out")
    return {"step_runs": runs}


retrying_step_saga = Saga("watchdog_retrying_step", steps=[
    Step(slow_retry_step, timeout_seconds=2),
])
