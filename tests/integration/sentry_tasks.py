"""Tasks of tests/integration/test_sentry.py, run by workers that report to Sentry.

The worker includes this module besides ``worker_tasks`` (``-I`` takes a comma-separated
list); runs are counted in Redis through ``worker_tasks.record_run``.
"""

from __future__ import annotations

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy
from recovery.core.errors import DependencyError

from .worker_tasks import record_run

QUICK = RetryPolicy(max_attempts=5, initial_delay_seconds=0.2, multiplier=2, max_delay_seconds=1)


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUICK)
def charge_card(self, key: str, card_token: str, amount: str, *, fail_for_good: bool) -> str:
    """Fails transiently twice (the gateway answers 503), then is declined for good, or
    succeeds when ``fail_for_good`` is false. ``card_token`` is a secret by its name."""
    runs = record_run(key)
    if runs <= 2:
        raise DependencyError(f"payment gateway answered 503 (run {runs})")
    if fail_for_good:
        raise DependencyError(f"card declined for amount {amount}", permanent=True)
    return f"charged {amount}"
