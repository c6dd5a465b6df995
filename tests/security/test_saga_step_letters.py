"""Attack: read a value that only the saga declares secret from the dead letter of one of
its steps, as a view-only staff user, from ``dlq show`` or from the step's result row.

A step is called with the run's context, so its letter holds the whole context. The
project's ``SECRET_KEYS`` do not name ``maiden_name``; the saga does
(``Saga(..., secret_keys=("maiden_name",))``), and the step's message carries those keys
in its ``recovery_saga`` header so every surface of its letter masks them too.
"""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.urls import reverse
from django_celery_results.models import TaskResult

from recovery.core import redaction
from recovery.models import DeadLetter, SagaRun
from recovery.workflows.sagas import Saga, Step
from tasks import standins
from tasks.models import ServiceFault

from ..integration.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

MAIDEN_NAME = "Featherstonehaugh-STEP"
HELD = Saga("checkout-held-secret", on_failure="hold", secret_keys=("maiden_name",), steps=[
    Step("tasks.orders.reserve_inventory", compensate="tasks.orders.release_inventory"),
    Step("tasks.orders.charge_payment", compensate="tasks.orders.refund_payment"),
])


def test_a_steps_letter_and_result_row_are_masked_by_the_keys_its_saga_declares(
        start_worker, staff_client):
    # Given a saga declaring maiden_name secret, whose payment step fails for good with a
    # message quoting it, on a real worker
    start_worker()
    standins.set_fault("payments", "charge", ServiceFault.Mode.REFUSE,
                       message=f"card declined for {MAIDEN_NAME}")
    run = HELD.start(order_id=42, sku="BOOK-1", quantity=1, amount_cents=2500,
                     maiden_name=MAIDEN_NAME)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=f"saga-{run.pk}-1-step").first(),
                      30, message="the payment step to be parked")
    wait_for(lambda: SagaRun.objects.get(pk=run.pk).status == SagaRun.Status.HELD, 20,
             message="the run to be held")
    # Then the letter keeps the real context (a replay needs it) and the keys it is masked by
    assert letter.args[0]["maiden_name"] == MAIDEN_NAME
    assert redaction.saga_secret_keys(letter.headers) == ("maiden_name",)
    # and the stored exception text was scrubbed before it was written
    assert MAIDEN_NAME not in letter.exception_message + letter.traceback + str(letter.history)
    assert "card declined for" in letter.exception_message
    # When a view-only user opens the letter, and a shell user runs dlq show without --reveal
    viewer = staff_client()
    page = viewer.get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    assert page.status_code == 200
    out = io.StringIO()
    call_command("dlq", "show", str(letter.pk), stdout=out)
    # Then the name appears on neither, nor in the step's result row
    assert MAIDEN_NAME not in page.content.decode()
    assert redaction.MASK in page.content.decode()
    assert MAIDEN_NAME not in out.getvalue()
    rows = TaskResult.objects.filter(task_id=letter.task_id)
    assert rows.exists()
    for row in rows:
        assert MAIDEN_NAME not in f"{row.task_args}{row.task_kwargs}{row.result}{row.traceback}"


def test_a_forged_saga_header_can_only_mask_more():
    # Given a letter whose forged recovery_saga header names keys of its own
    letter = DeadLetter(task_id="forged-1", task_name="tasks.orders.charge_payment",
                        args=[{"order_id": 1, "card_token": "tok_live_FORGED", "note": "hi"}],
                        kwargs={}, fingerprint="f" * 40,
                        headers={"headers": {"recovery_saga": {
                            "run": 1, "step": 0, "secret_keys": ["note", 7, None, ""]}}})
    shown = redaction.shown_letter(letter)
    # Then the project's keys still apply, and the header's only add to them
    assert shown.args[0]["card_token"] == redaction.MASK
    assert shown.args[0]["note"] == redaction.MASK
    assert shown.args[0]["order_id"] == 1
