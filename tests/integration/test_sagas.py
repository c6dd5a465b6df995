"""The order saga (``tasks.orders``) on real worker processes, Redis and PostgreSQL.

The stand-in services record every effect once per idempotency key
(``tasks.models.ServiceEffect``) and every call (``ServiceCall``, with the worker pid);
their failures are set from here with ``ServiceFault`` rows.
"""

from __future__ import annotations

import os
import signal

import pytest

from recovery.operations import replay
from recovery.workflows import sagas
from recovery.models import DeadLetter, OutboxMessage, SagaRun, SagaStep
from tasks import standins
from tasks.models import ServiceCall, ServiceEffect, ServiceFault
from tasks.orders import place_order, place_order_or_hold

from ..brokers import unacknowledged
from . import worker_tasks as t
from .harness import wait_for

pytestmark = pytest.mark.integration

ORDER = {"order_id": 42, "sku": "BOOK-1", "quantity": 1, "amount_cents": 2500}


def settled(run: SagaRun, *statuses: str, timeout: float = 20) -> SagaRun:
    def done():
        run.refresh_from_db()
        return run.status in statuses
    wait_for(done, timeout, message=f"run {run.pk} to be {' or '.join(statuses)}")
    return run


def effects() -> list[tuple[str, str, str]]:
    """Every effect the stand-ins applied, in the order they were applied."""
    return list(ServiceEffect.objects.order_by("at", "pk").values_list("service", "action", "key"))


def calls(service: str, action: str) -> list[str]:
    return list(ServiceCall.objects.filter(service=service, action=action)
                .order_by("at", "pk").values_list("outcome", flat=True))


def kill_the_child_running(worker, service: str, action: str) -> None:
    """SIGKILL the pool child that is inside ``service.action`` (hanging after its effect)."""
    call = wait_for(lambda: ServiceCall.objects.filter(service=service, action=action).first(), 15,
                    message=f"{service}.{action} to be called")
    assert call.pid in worker.child_pids()
    os.kill(call.pid, signal.SIGKILL)


def test_a_saga_failing_at_step_3_compensates_steps_2_and_1_in_order_once(start_worker):
    start_worker()
    standins.set_fault("shipping", "ship", ServiceFault.Mode.REFUSE,
                       message="carrier rejected the address")
    run = settled(place_order.start(**ORDER), "compensated")
    k = run.pk
    # Each step and compensation took effect once; compensations in reverse order.
    assert effects() == [("inventory", "reserve", f"{k}:0"), ("payments", "charge", f"{k}:1"),
                         ("payments", "refund", f"{k}:1:compensation"), ("inventory", "release", f"{k}:0:compensation")]
    assert calls("payments", "refund") == ["applied"]
    assert calls("inventory", "release") == ["applied"]
    rows = {(row.index, row.role): row for row in run.steps.all()}
    assert [rows[(i, "step")].status for i in range(3)] == ["compensated", "compensated", "failed"]
    assert rows[(1, "compensation")].finished_at <= rows[(0, "compensation")].started_at
    assert "carrier rejected the address" in run.error
    assert all(row.started_at and row.finished_at for row in rows.values())
    # The shipment's letter is closed with the run: nobody ships a cancelled order later.
    assert DeadLetter.objects.get(task_id=f"saga-{k}-2-step").status == "compensated"


def test_worker_child_killed_in_step_2_and_in_a_compensation_repeats_no_effect(start_worker):
    worker = start_worker()
    standins.set_fault("payments", "charge", ServiceFault.Mode.HANG_AFTER_EFFECT, seconds=60)
    standins.set_fault("payments", "refund", ServiceFault.Mode.HANG_AFTER_EFFECT, seconds=60)
    standins.set_fault("shipping", "ship", ServiceFault.Mode.REFUSE)
    run = place_order.start(**ORDER)
    # The card is charged, then the child dies before the step returns.
    kill_the_child_running(worker, "payments", "charge")
    # The refund is applied, then the child dies before the compensation returns.
    kill_the_child_running(worker, "payments", "refund")
    run = settled(run, "compensated")
    k = run.pk
    # The killed step and compensation ran again (redelivered), without a second effect.
    assert calls("payments", "charge") == ["applied", "already"]
    assert calls("payments", "refund") == ["applied", "already"]
    assert effects() == [("inventory", "reserve", f"{k}:0"), ("payments", "charge", f"{k}:1"),
                         ("payments", "refund", f"{k}:1:compensation"), ("inventory", "release", f"{k}:0:compensation")]
    assert calls("inventory", "reserve") == ["applied"]  # the saga never ran a step twice
    assert SagaStep.objects.get(run=run, index=1, role="step").attempts == 2
    assert SagaStep.objects.get(run=run, index=1, role="compensation").attempts == 2
    assert not DeadLetter.objects.filter(task_id__in=[f"saga-{k}-1-step",
                                                      f"saga-{k}-1-compensation"]).exists()


def test_a_step_message_delivered_again_after_the_run_moved_on_advances_nothing(start_worker):
    from config.celery import app

    worker = start_worker()
    run = settled(place_order.start(**ORDER), "succeeded")
    k = run.pk
    intents = OutboxMessage.objects.count()
    # Step 0's message again, as a redelivery after an ack lost with its worker would be.
    app.send_task("tasks.orders.reserve_inventory", args=[ORDER], task_id=f"saga-{k}-0-step",
                  headers={"recovery_saga": {"run": k, "step": 0, "role": "step"}})
    # It is recognised as stale (its step has moved on) and dropped without running.
    stale = f"tasks.orders.reserve_inventory[saga-{k}-0-step]: stale saga message"
    wait_for(lambda: stale in worker.log(), 10, message="the duplicate to be dropped")
    assert calls("inventory", "reserve") == ["applied"]  # the step did not run again
    assert OutboxMessage.objects.count() == intents  # nothing dispatched again
    assert calls("payments", "charge") == ["applied"]
    run.refresh_from_db()
    assert run.status == "succeeded" and run.context["reservation_id"] == f"res-{k}:0"


def test_a_compensation_failing_for_good_is_parked_and_the_run_needs_a_human(start_worker):
    worker = start_worker()
    standins.set_fault("shipping", "ship", ServiceFault.Mode.REFUSE)
    standins.set_fault("payments", "refund", ServiceFault.Mode.REFUSE,
                       message="refund API: payment id unknown")
    run = settled(place_order.start(**ORDER), "needs_human")
    k = run.pk
    letter = DeadLetter.objects.get(task_id=f"saga-{k}-1-compensation")
    assert letter.status == "parked" and letter.task_name == "tasks.orders.refund_payment"
    assert "refund API: payment id unknown" in run.error
    assert run.events.get().action == "escalated"
    wait_for(lambda: "NEEDS A HUMAN" in worker.log(), 5, message="the CRITICAL log line")
    # Nothing after the failed compensation ran: the reservation is still held.
    assert ("inventory", "release", f"{k}:0:compensation") not in effects()
    # The refund API is fixed; the operator compensates the run again.
    standins.clear_faults("payments", "refund")
    sagas.compensate(run, actor="ops", note="refund API fixed")
    run = settled(run, "compensated")
    assert calls("payments", "refund") == ["refused", "applied"]
    assert ("inventory", "release", f"{k}:0:compensation") in effects()
    assert DeadLetter.objects.get(pk=letter.pk).status == "resolved"


def test_a_held_run_resumes_from_the_failed_step_once_the_standin_is_fixed(start_worker):
    start_worker()
    standins.set_fault("shipping", "ship", ServiceFault.Mode.REFUSE)
    run = settled(place_order_or_hold.start(**ORDER), "held")
    k = run.pk
    assert effects() == [("inventory", "reserve", f"{k}:0"), ("payments", "charge", f"{k}:1")]
    standins.clear_faults("shipping")
    sagas.resume(run, actor="ops", note="carrier address fixed")
    run = settled(run, "succeeded")
    # Only the failed step ran again, under a new task id; earlier steps did not.
    assert effects() == [("inventory", "reserve", f"{k}:0"), ("payments", "charge", f"{k}:1"),
                         ("shipping", "ship", f"{k}:2")]
    ship = SagaStep.objects.get(run=run, index=2, role="step")
    assert (ship.task_id, ship.dispatches, ship.status) == (f"saga-{k}-2-step.2", 2, "succeeded")
    assert run.context["tracking"] == f"trk-{k}:2"
    assert DeadLetter.objects.get(task_id=f"saga-{k}-2-step").status == "resolved"


def test_the_dead_letter_compensate_action_compensates_the_saga(start_worker):
    start_worker()
    standins.set_fault("shipping", "ship", ServiceFault.Mode.REFUSE)
    run = settled(place_order_or_hold.start(**ORDER), "held")
    letter = DeadLetter.objects.get(task_id=f"saga-{run.pk}-2-step")
    replay.compensate(letter, actor="ops", note="customer cancelled")
    run = settled(run, "compensated")
    assert [action for _, action, _ in effects()] == ["reserve", "charge", "refund", "release"]
    assert DeadLetter.objects.get(pk=letter.pk).status == "compensated"


def test_a_step_completing_while_the_database_is_cut_advances_the_run_once_it_is_back(
        start_worker, store, key, db_proxy, worker_env, settings):
    # Given a worker that reaches PostgreSQL through a proxy, running a saga's first step
    db = worker_env["TEST_DATABASE_URL"].rsplit("@", 1)
    start_worker(env={"TEST_DATABASE_URL":
                      f"{db[0]}@127.0.0.1:{db_proxy.port}/{db[1].split('/', 1)[1]}"})
    run = t.two_legs.start(key=key)
    wait_for(lambda: store.get(f"t:waiting:{key}"), 30, message="the first step to run")
    # When the database drops off the network and then the step returns
    db_proxy.cut()
    store.set(f"t:go:{key}", 1)
    spool = settings.RECOVERY["SPOOL_DIR"]
    wait_for(lambda: os.path.isdir(spool) and
             sum(f.endswith(".json") for f in os.listdir(spool)) >= 2, 30,
             message="the result and the step's completion spooled")
    wait_for(lambda: unacknowledged(store) == 0, 20, message="step message acknowledged")
    run.refresh_from_db()
    assert run.status == "running"
    # Then once the database is back the run advances to the next step and finishes
    db_proxy.restore()
    run = settled(run, "succeeded", timeout=40)
    assert run.context == {"key": key, "first": "done", "second": "done", "saw_first": "done"}
    # And the first step's body ran exactly once
    assert int(store.get(f"t:runs:{key}:first")) == 1
    assert int(store.get(f"t:runs:{key}:second")) == 1
    assert not DeadLetter.objects.filter(task_id__startswith=f"saga-{run.pk}-").exists()
