"""Tasks and a saga the watchdog tests run on real worker processes
(``tests/integration/test_watchdog.py``; workers include this module with ``-I``)."""

from __future__ import annotations

import os
import time

from celery import shared_task

from recovery import RecoveryTask
from recovery.sagas import Saga, Step

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
