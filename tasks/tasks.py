"""Example workflows a project would copy: each shows one failure scenario.

Retry delays are short so the demo finishes in seconds; production policies
would start at seconds and cap at minutes.
"""

from __future__ import annotations

from celery import shared_task

from recovery import (DataIntegrityError, DependencyError, RecoveryTask, ResourceExhaustedError,
                      RetryPolicy, TimeoutOrDeadlockError)

from .models import Customer

def _outcome(task, **result) -> dict:
    """The task's result plus how it got there, for the demo's table."""
    history = task.attempt_history
    return {**result, "attempts": len(history) + 1,
            "recovered_from": sorted({entry["kind"] for entry in history})}


DEMO_POLICY = RetryPolicy(max_attempts=4, initial_delay_seconds=0.5, multiplier=2.0,
                          max_delay_seconds=2.0, jitter="full")


@shared_task(base=RecoveryTask, bind=True, retry_policy=DEMO_POLICY)
def fetch_exchange_rate(self, currency: str, fail_times: int = 2) -> dict:
    """An external API that answers 503 a few times, then recovers (transient dependency)."""
    if self.request.retries < fail_times:
        raise DependencyError(f"rates API answered 503 for {currency}")
    return _outcome(self, currency=currency, rate=1.08)


@shared_task(base=RecoveryTask, bind=True, retry_policy=DEMO_POLICY)
def cancel_order(self, order_id: int, amount_cents: int) -> dict:
    """Undo an order whose payment failed for good: release its stock, tell the customer.

    The compensation of ``charge_payment``; an operator runs it from the dead-letter
    admin ("Compensate…") or ``manage.py dlq compensate``. Its task id is stable per
    letter, so it doubles as the idempotency key a real cancellation would record.
    """
    return {"order_id": order_id, "cancelled": True, "idempotency_key": self.request.id}


@shared_task(base=RecoveryTask, bind=True, retry_policy=DEMO_POLICY,
             compensate="tasks.tasks.cancel_order", critical=True)
def charge_payment(self, order_id: int, amount_cents: int) -> dict:
    """A payment provider that declines a card: permanent, parked after one attempt.

    Declares ``cancel_order`` as its compensation, and is critical: its first dead letter
    opens an incident (``recovery.observe.escalation``) instead of waiting for a threshold.
    """
    if amount_cents > 100_000:
        raise DependencyError(f"card declined for order {order_id}: amount over limit",
                              permanent=True)
    return _outcome(self, order_id=order_id, charged=amount_cents)


@shared_task(base=RecoveryTask, bind=True, retry_policy=DEMO_POLICY)
def import_customer_row(self, row: dict) -> dict:
    """A data import: a row without an email is invalid data and cannot be retried.

    The customer row is written behind ``self.effect``: a run after a crash, a retry or a
    replay of the row's letter finds it written and does not write it twice.
    """
    if not row.get("email") or "@" not in row["email"]:
        raise DataIntegrityError(f"row {row.get('id')!r} has no valid email: {row.get('email')!r}")
    with self.effect("customer") as first:
        if first:
            Customer.objects.create(external_id=str(row["id"]), email=row["email"],
                                    imported_by=self.request.id)
    return _outcome(self, imported=row["id"])


@shared_task(base=RecoveryTask, bind=True, retry_policy=DEMO_POLICY)
def send_newsletter_batch(self, batch: int) -> dict:
    """A rate-limited API: 429 with Retry-After once, then accepted."""
    if self.request.retries < 1:
        raise ResourceExhaustedError("mail API rate limit (429)", retry_after_seconds=1.0)
    return _outcome(self, batch=batch, sent=True)


@shared_task(base=RecoveryTask, bind=True, retry_policy=DEMO_POLICY)
def build_monthly_report(self, month: str) -> dict:
    """A report query that keeps losing a deadlock: retried, then parked when the policy gives up."""
    raise TimeoutOrDeadlockError(f"deadlock detected building report {month}")


EXAMPLES = [
    (fetch_exchange_rate, ("EUR",), {"fail_times": 2}),
    (charge_payment, (41, 2_500), {}),
    (charge_payment, (42, 250_000), {}),
    (import_customer_row, ({"id": 7, "email": "ada@example.com"},), {}),
    (import_customer_row, ({"id": 8, "email": ""},), {}),
    (send_newsletter_batch, (3,), {}),
    (build_monthly_report, ("2026-10",), {}),
]


# The order saga's tasks: autodiscovery imports tasks.tasks only.
from . import orders  # noqa: E402,F401
# The circuit-breaker, fallback and degraded-mode examples.
from . import partners  # noqa: E402,F401
