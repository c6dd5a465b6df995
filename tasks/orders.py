"""The order saga: reserve stock, charge the card, ship; undo in reverse when one fails.

Each step is a RecoveryTask that receives the saga's context (``{"order_id": ...,
"sku": ..., "quantity": ..., "amount_cents": ...}`` plus what earlier steps returned) and
returns what later steps need. Each talks to a stand-in service (``tasks.standins``)
with the step's idempotency key (``recovery.workflows.sagas.step_key``), so a step that runs again
(a retry, a redelivery after its worker died) never repeats its effect. Compensations
receive the same key as ``idempotency_key``.

    run = place_order.start(order_id=42, sku="BOOK-1", quantity=1, amount_cents=2500,
                            idempotency_key="order-42")
"""

from __future__ import annotations

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy, Saga, Step
from recovery.workflows.sagas import step_key

from . import standins

ORDER_POLICY = RetryPolicy(max_attempts=4, initial_delay_seconds=0.3, multiplier=2.0,
                           max_delay_seconds=2.0, jitter="full")


@shared_task(base=RecoveryTask, bind=True, retry_policy=ORDER_POLICY)
def reserve_inventory(self, order: dict) -> dict:
    key = step_key(self)
    standins.perform("inventory", "reserve", key,
                     {"sku": order.get("sku"), "quantity": order.get("quantity", 1)})
    return {"reservation_id": f"res-{key}"}


@shared_task(base=RecoveryTask, bind=True, retry_policy=ORDER_POLICY)
def release_inventory(self, order: dict, idempotency_key: str) -> dict:
    standins.perform("inventory", "release", idempotency_key,
                     {"reservation_id": order.get("reservation_id")})
    return {"reservation_released": True}


@shared_task(base=RecoveryTask, bind=True, retry_policy=ORDER_POLICY)
def charge_payment(self, order: dict) -> dict:
    key = step_key(self)
    standins.perform("payments", "charge", key, {"amount_cents": order["amount_cents"]})
    return {"payment_id": f"pay-{key}"}


@shared_task(base=RecoveryTask, bind=True, retry_policy=ORDER_POLICY)
def refund_payment(self, order: dict, idempotency_key: str) -> dict:
    standins.perform("payments", "refund", idempotency_key,
                     {"payment_id": order.get("payment_id"),
                      "amount_cents": order.get("amount_cents")})
    return {"refunded": True}


@shared_task(base=RecoveryTask, bind=True, retry_policy=ORDER_POLICY)
def create_shipment(self, order: dict) -> dict:
    key = step_key(self)
    standins.perform("shipping", "ship", key, {"order_id": order.get("order_id")})
    return {"tracking": f"trk-{key}"}


place_order = Saga("place_order", steps=[
    Step(reserve_inventory, compensate=release_inventory),
    Step(charge_payment, compensate=refund_payment),
    Step(create_shipment),
])

#: the same steps, but a failure waits for an operator (resume or compensate) instead of
#: undoing the order at once
place_order_or_hold = Saga("place_order_or_hold", steps=place_order.steps, on_failure="hold")


def run_demo(timeout: float = 60.0) -> list[tuple[str, str, str, str]]:
    """``manage.py demo``: one order that ships, one whose shipment the carrier refuses
    (so its charge and reservation are undone, last first). Rows: run, order, status, steps."""
    import time

    from recovery.models import SagaRun

    from .models import ServiceFault

    def settle(run: SagaRun) -> SagaRun:
        deadline = time.monotonic() + timeout
        while run.status in (SagaRun.Status.RUNNING, SagaRun.Status.COMPENSATING):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
            run.refresh_from_db()
        return run

    runs = [settle(place_order.start(order_id=501, sku="BOOK-1", quantity=1, amount_cents=2500))]
    standins.set_fault("shipping", "ship", ServiceFault.Mode.REFUSE,
                       message="carrier rejected the address of order 502")
    try:
        runs.append(settle(place_order.start(order_id=502, sku="BOOK-2", quantity=2,
                                             amount_cents=4200)))
    finally:
        standins.clear_faults("shipping", "ship")
    rows = []
    for run in runs:
        steps = ", ".join(f"{row.task_name.rsplit('.', 1)[-1]} {row.status}"
                          for row in run.steps.filter(role="step").order_by("index"))
        rows.append((str(run.pk), str(run.context.get("order_id")), run.status, steps))
    return rows


def run_rehearsal_demo(timeout: float = 60.0) -> str:
    """``manage.py demo``: a rehearsal of the order saga. The payment provider "fails
    permanently" for 30 seconds (``manage.py rehearse start --task
    tasks.orders.charge_payment --fault permanent --rate 1 --for 30s``); two orders placed
    meanwhile park their charge and are compensated (their stock released); the rehearsal is
    stopped and its report returned."""
    import time

    from recovery.models import SagaRun
    from recovery.operations import rehearsal_report
    from recovery.workflows import rehearsals

    rehearsal = rehearsals.start(task=charge_payment.name, fault="permanent", rate=1.0,
                                 duration=rehearsals.parse_duration("30s"), actor="demo",
                                 message="payment provider down (rehearsal)")
    try:
        # Workers read the running rehearsals at most once a second: give them that second.
        time.sleep(rehearsals.READ_INTERVAL_SECONDS + 0.2)
        runs = [place_order.start(order_id=order_id, sku="BOOK-3", quantity=1, amount_cents=1900)
                for order_id in (601, 602)]
        deadline = time.monotonic() + timeout
        for run in runs:
            while run.status in (SagaRun.Status.RUNNING, SagaRun.Status.COMPENSATING):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
                run.refresh_from_db()
    finally:
        rehearsals.stop([rehearsal.pk], actor="demo")
    return rehearsal_report.format_report(rehearsal_report.report(rehearsal))
