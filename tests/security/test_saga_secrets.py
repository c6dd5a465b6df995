"""Attack: read the secrets a saga carries (its context, what its steps returned, the
errors that quote them) from the saga admin as a view-only user, or from Sentry.

A saga declares its own secret keys (``Saga(..., secret_keys=(...))``); the project's
``RECOVERY["SECRET_KEYS"]`` apply to every saga. Only a user with
``recovery.reveal_deadletter_secrets`` may reveal them, and only when asking (``?reveal=1``).
"""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from recovery.workflows import sagas
from recovery.core.errors import DependencyError
from recovery.models import SagaRun, SagaStep
from recovery.core.redaction import MASK
from recovery.workflows.sagas import Saga, SagaDefinitionError, Step

from ..recovery.test_sentry import (  # noqa: F401 - fixtures
    _forget_main_process_reports, escalation, init_sentry, stand_in, wait_for_events)

pytestmark = pytest.mark.django_db

CARD_TOKEN = "tok_live_5151SAGAsecret"      # a project secret key (token)
MAIDEN_NAME = "Featherstonehaugh-SAGA"      # secret only because the saga declares it
PAYMENT_SECRET = "psec_8080SAGAsecret"      # a step's result under a project key (secret)
SECRETS = (CARD_TOKEN, MAIDEN_NAME, PAYMENT_SECRET)

STEPS = [
    Step("tasks.orders.reserve_inventory", compensate="tasks.orders.release_inventory"),
    Step("tasks.orders.charge_payment", compensate="tasks.orders.refund_payment"),
]
HELD = Saga("checkout-held", steps=STEPS, on_failure="hold", secret_keys=("maiden_name",))
COMPENSATING = Saga("checkout", steps=STEPS, secret_keys=("maiden_name",))
QUOTING = DependencyError(f"card {CARD_TOKEN} declined for {MAIDEN_NAME}", permanent=True)


def run_through_step_1(saga: Saga) -> SagaRun:
    """A run whose step 0 returned a secret and whose step 1 failed quoting secrets."""
    run = saga.start(order_id=42, card_token=CARD_TOKEN, maiden_name=MAIDEN_NAME)
    sagas.on_task_succeeded({"run": run.pk, "step": 0, "role": "step"},
                            {"reservation_id": "r-1", "payment_secret": PAYMENT_SECRET},
                            f"saga-{run.pk}-0-step")
    sagas.on_task_parked({"run": run.pk, "step": 1, "role": "step"}, f"saga-{run.pk}-1-step",
                         QUOTING)
    run.refresh_from_db()
    return run


def staff(client, *codenames):
    user = get_user_model().objects.create_user("saga-viewer", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_sagarun", *codenames)))
    client.force_login(user)
    return client


def page(client, url, **query) -> str:
    response = client.get(url, query)
    assert response.status_code == 200
    return response.content.decode()


def test_a_view_only_user_sees_no_saga_secret_on_any_saga_page(client):
    # Given a held run that carries secrets in its context, a step result and its errors
    run = run_through_step_1(HELD)
    assert run.status == SagaRun.Status.HELD
    # (errors are stored scrubbed; a run recorded before that still holds them in clear)
    assert CARD_TOKEN not in run.error and "declined for" in run.error
    SagaRun.objects.filter(pk=run.pk).update(error=f"step 1 failed: {QUOTING}")
    SagaStep.objects.filter(run=run, index=1, role="step").update(error=str(QUOTING))
    # When a staff user who may view (and resume) runs, but not reveal, opens its pages
    viewer = staff(client, "resume_sagarun")
    pages = [
        page(viewer, reverse("admin:recovery_sagarun_change", args=[run.pk])),
        page(viewer, reverse("admin:recovery_sagarun_change", args=[run.pk]), reveal="1"),
        page(viewer, reverse("admin:recovery_sagarun_changelist")),
        page(viewer, reverse("admin:recovery_sagarun_resume", args=[run.pk])),
    ]
    # Then no secret is on any of them, but what is not secret still is
    for shown in pages:
        for secret in SECRETS:
            assert secret not in shown
    change = pages[0]
    assert MASK in change and "r-1" in change and "declined for" in change


def test_a_user_who_may_reveal_sees_the_secrets_only_when_asking(client):
    run = run_through_step_1(HELD)
    revealer = staff(client, "reveal_deadletter_secrets")
    url = reverse("admin:recovery_sagarun_change", args=[run.pk])
    masked = page(revealer, url)
    for secret in SECRETS:
        assert secret not in masked
    revealed = page(revealer, url, reveal="1")
    for secret in SECRETS:
        assert secret in revealed


def test_a_saga_that_needs_a_human_reaches_sentry_without_its_secrets(
        init_sentry, stand_in, escalation, django_capture_on_commit_callbacks):
    # Given a real Sentry client sending to a local server, and a compensating run
    init_sentry()
    escalation(ADMIN_BASE_URL="https://ops.example.com/")
    run = run_through_step_1(COMPENSATING)
    assert run.status == SagaRun.Status.COMPENSATING
    compensation = SagaStep.objects.get(run=run, index=0, role="compensation")
    # When its compensation fails for good, quoting the secrets (the run needs a human)
    with django_capture_on_commit_callbacks(execute=True):
        sagas.on_task_parked({"run": run.pk, "step": 0, "role": "compensation"},
                             compensation.task_id, QUOTING)
    # Then Sentry receives the incident, and no secret in any byte it was sent
    [event] = wait_for_events(stand_in, 1)
    assert event["contexts"]["incident"]["saga_run_id"] == run.pk
    for secret in SECRETS:
        assert secret.encode() not in stand_in.raw()
    details = event["contexts"]["incident"]["details"]
    assert details["context"]["maiden_name"] == MASK and details["context"]["order_id"] == 42
    assert "declined for" in details["failed_step"]["error"]


def test_saga_show_masks_the_run_unless_asked_to_reveal():
    # Given a held run whose stored errors predate scrubbing
    run = run_through_step_1(HELD)
    SagaRun.objects.filter(pk=run.pk).update(error=f"step 1 failed: {QUOTING}")
    SagaStep.objects.filter(run=run, index=1, role="step").update(error=str(QUOTING))
    # When an operator lists it and shows it, then shows it with --reveal
    listed, shown, revealed = io.StringIO(), io.StringIO(), io.StringIO()
    call_command("saga", "list", stdout=listed)
    call_command("saga", "show", str(run.pk), stdout=shown)
    call_command("saga", "show", str(run.pk), "--reveal", stdout=revealed)
    # Then only the revealed output holds the secrets
    for secret in (CARD_TOKEN, MAIDEN_NAME):
        assert secret not in listed.getvalue() and secret not in shown.getvalue()
        assert secret in revealed.getvalue()
    assert '"order_id": 42' in shown.getvalue()


def test_every_reveal_of_a_run_leaves_a_revealed_event_naming_who(client):
    # Given a run with secrets, and a user who may reveal them
    run = run_through_step_1(HELD)
    revealer = staff(client, "reveal_deadletter_secrets")
    url = reverse("admin:recovery_sagarun_change", args=[run.pk])
    # When they open it masked, then revealed; and a shell user runs saga show --reveal
    page(revealer, url)
    assert not run.events.filter(action="revealed").exists()
    page(revealer, url, reveal="1")
    call_command("saga", "show", str(run.pk), "--reveal", stdout=io.StringIO())
    # Then each reveal (and only a reveal) is on the run's audit trail
    events = list(run.events.filter(action="revealed").order_by("at", "pk"))
    assert [(e.actor, e.note) for e in events] == [
        ("saga-viewer", "admin change page"), (events[1].actor, "saga show --reveal")]
    assert events[1].actor.startswith("cli:")


def test_asking_to_reveal_without_the_permission_shows_masked_and_records_nothing(client):
    run = run_through_step_1(HELD)
    viewer = staff(client)
    shown = page(viewer, reverse("admin:recovery_sagarun_change", args=[run.pk]), reveal="1")
    assert CARD_TOKEN not in shown
    assert not run.events.filter(action="revealed").exists()


def test_the_dashboard_shows_a_runs_error_scrubbed(client):
    # Given a run that needs a human, its error stored (by an older version) quoting secrets
    run = run_through_step_1(COMPENSATING)
    SagaRun.objects.filter(pk=run.pk).update(status=SagaRun.Status.NEEDS_HUMAN,
                                             error=f"step 1 failed: {QUOTING}")
    # When a user who may only view dead letters opens the on-call dashboard
    user = get_user_model().objects.create_user("dash-viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client.force_login(user)
    text = page(client, reverse("admin:recovery_dashboard"))
    # Then the run is listed, its error without the secrets
    assert "step 1 failed" in text
    assert CARD_TOKEN not in text and MAIDEN_NAME not in text


def test_a_sagas_secret_keys_are_kept_with_each_run_and_checked_when_declared():
    run = HELD.start(order_id=7, maiden_name="x")
    assert run.definition["secret_keys"] == ["maiden_name"]
    # A saga that declares none keeps the version digest it had before secret_keys existed
    assert "secret_keys" not in Saga("plain", steps=STEPS).definition
    with pytest.raises(SagaDefinitionError, match="secret_keys"):
        Saga("bad", steps=STEPS, secret_keys=("",))
