"""Tasks of tests/security/test_result_rows.py, run by real workers (``-I`` adds this
module to ``worker_tasks``). ``card_token`` and ``api_key`` are secrets by their names."""

from __future__ import annotations

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy
from recovery.core.errors import DependencyError

CARD_TOKEN = "tok_live_4242ROWsecret"
API_KEY = "ak_live_7788ROWsecret"
ONCE = RetryPolicy(max_attempts=1)


@shared_task(base=RecoveryTask, bind=True, retry_policy=ONCE)
def charge(self, order: str, card_token: str, *, api_key: str, outcome: str = "ok") -> str:
    """Succeeds, is declined for good, or is declined quoting its secrets (``outcome``)."""
    if outcome == "declined":
        raise DependencyError(f"card declined for order {order}", permanent=True)
    if outcome == "quoted":
        raise DependencyError(f"token {card_token} declined for key {api_key}", permanent=True)
    return f"charged {order}"
