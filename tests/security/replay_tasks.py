"""Tasks the hostile-input tests run on real workers: they record what their message
carried, so the test process can see what a replay (or a forged message) handed them."""

from __future__ import annotations

import json

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy
from recovery.core import headers as hdr
from recovery.core.errors import PermanentError, TransientError
from tests.integration.worker_tasks import QUICK, store


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def echo_request(self, key: str) -> str:
    """Succeeds, recording the workflow options and routing its message came with."""
    request, delivery = self.request, self.request.delivery_info or {}
    store().rpush(f"sec:seen:{key}", json.dumps({
        "callbacks": request.callbacks, "errbacks": request.errbacks, "chain": request.chain,
        "reply_to": request.reply_to, "exchange": delivery.get("exchange"),
        "routing_key": delivery.get("routing_key"), "x_evil": hdr.read(request, "x-evil"),
        "history": hdr.read(request, hdr.HISTORY),
    }, default=str))
    return key


@shared_task
def mark(key: str) -> None:
    """What an attacker links to a letter: its run must never happen."""
    store().set(f"sec:marker:{key}", 1)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def refuses(self, key: str, payload=None) -> None:
    """Fails for good at once, with an exception message of ``len(payload)`` characters
    when ``payload`` is a string (the hostile-size tests)."""
    store().incr(f"sec:runs:{key}")
    message = payload if isinstance(payload, str) else "refused"
    raise PermanentError(message)


@shared_task(base=RecoveryTask, bind=True,
             retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=0.1,
                                      max_delay_seconds=0.3, jitter="decorrelated"))
def always_busy(self, key: str) -> None:
    """Fails transiently every time: its policy reads the history's delays (decorrelated
    jitter grows from the previous delay)."""
    store().incr(f"sec:runs:{key}")
    raise TransientError("partner busy")


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def measures(self, key: str, payload: str = "") -> int:
    """Succeeds, recording how many characters of ``payload`` it was handed."""
    store().set(f"sec:size:{key}", len(payload))
    return len(payload)
