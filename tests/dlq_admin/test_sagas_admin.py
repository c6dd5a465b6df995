"""Saga runs in the admin and in ``manage.py saga``: see, resume, compensate, with
permissions, confirmation pages and an audit trail. Real PostgreSQL; nothing is
published (the test's transaction never commits, so the outbox keeps the intents)."""

from __future__ import annotations

import io

import pytest
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from recovery.workflows import sagas
from recovery.core.errors import DependencyError
from recovery.models import DeadLetter, SagaRun
from recovery.workflows.sagas import Saga, Step

pytestmark = pytest.mark.django_db

ORDER = Saga("order", steps=[
    Step("tasks.orders.reserve_inventory", compensate="tasks.orders.release_inventory"),
    Step("tasks.orders.charge_payment", compensate="tasks.orders.refund_payment"),
    Step("tasks.orders.create_shipment"),
], on_failure="hold")


def held_run() -> SagaRun:
    """A run whose step 0 succeeded and step 1 was parked: held."""
    run = ORDER.start(order_id=42)
    sagas.on_task_succeeded({"run": run.pk, "step": 0, "role": "step"}, {"reservation_id": "r"},
                            f"saga-{run.pk}-0-step")
    header = {"run": run.pk, "step": 1, "role": "step"}
    DeadLetter.objects.create(task_id=f"saga-{run.pk}-1-step",
                              task_name="tasks.orders.charge_payment", fingerprint="f" * 40,
                              headers={"headers": {"recovery_saga": header}},
                              exception_type="recovery.errors.DependencyError",
                              exception_message="card declined")
    sagas.on_task_parked(header, f"saga-{run.pk}-1-step",
                         DependencyError("card declined", permanent=True))
    run.refresh_from_db()
    assert run.status == "held"
    return run


def operator(client, *codenames):
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_sagarun", "view_deadletter", *codenames)))
    client.force_login(user)
    return client


def test_the_list_shows_runs_and_filters_those_waiting_for_an_operator(client):
    run = held_run()
    ORDER.start(order_id=43)
    operator(client)
    page = client.get(reverse("admin:recovery_sagarun_changelist"))
    assert page.status_code == 200
    assert b"Held for an operator" in page.content and b"1: charge_payment" in page.content
    waiting = client.get(reverse("admin:recovery_sagarun_changelist"), {"waiting": "any"})
    assert list(waiting.context["cl"].result_list) == [run]


def test_the_run_page_shows_steps_timings_errors_and_buttons_by_permission(client):
    run = held_run()
    operator(client)
    url = reverse("admin:recovery_sagarun_change", args=[run.pk])
    page = client.get(url).content.decode()
    assert f"saga-{run.pk}-1-step" in page
    assert "recovery.errors.DependencyError: card declined" in page
    assert "Resume from failed step…" not in page and "Compensate…" not in page
    client.logout()
    get_user_model().objects.all().delete()
    operator(client, "resume_sagarun", "compensate_sagarun")
    page = client.get(url).content.decode()
    assert "Resume from failed step…" in page and "Compensate…" in page


def test_resume_needs_its_permission_and_a_confirmation(client):
    run = held_run()
    operator(client, "compensate_sagarun")
    url = reverse("admin:recovery_sagarun_resume", args=[run.pk])
    assert client.get(url).status_code == 403
    assert client.post(url, {"post": "yes"}).status_code == 403
    user = get_user_model().objects.get(username="op")
    user.user_permissions.add(Permission.objects.get(codename="resume_sagarun"))
    confirm = client.get(url)
    assert confirm.status_code == 200 and b"Yes, resume" in confirm.content
    assert SagaRun.objects.get(pk=run.pk).status == "held"  # a GET changes nothing
    done = client.post(url, {"post": "yes", "note": "limit raised"}, follow=True)
    assert b"1 saga run was resumed." in done.content
    run.refresh_from_db()
    assert run.status == "running"
    event = run.events.get()
    assert (event.action, event.actor, event.note) == ("resumed", "op", "limit raised")


def test_compensate_selected_runs_after_confirmation(client):
    held = held_run()
    running = ORDER.start(order_id=44)
    operator(client, "compensate_sagarun")
    data = {"action": "compensate_selected",
            helpers.ACTION_CHECKBOX_NAME: [str(held.pk), str(running.pk)]}
    changelist = reverse("admin:recovery_sagarun_changelist")
    confirm = client.post(changelist, data)
    assert b"You are about to compensate 1 saga run" in confirm.content
    assert b"1 selected run that is not held, needs_human, succeeded" in confirm.content
    done = client.post(changelist, {**data, "post": "yes", "note": "cancelled"}, follow=True)
    assert b"1 saga run was compensated." in done.content
    assert SagaRun.objects.get(pk=held.pk).status == "compensating"
    assert SagaRun.objects.get(pk=running.pk).status == "running"


def test_a_saga_letter_offers_compensate_in_the_dead_letter_admin(client):
    run = held_run()
    letter = DeadLetter.objects.get(task_id=f"saga-{run.pk}-1-step")
    operator(client, "compensate_deadletter")
    page = client.get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    assert b"Compensate\xe2\x80\xa6" in page.content
    url = reverse("admin:recovery_deadletter_compensate", args=[letter.pk])
    assert b"compensates its saga run instead" in client.get(url).content
    client.post(url, {"note": "cancelled"})
    assert DeadLetter.objects.get(pk=letter.pk).status == "compensated"
    assert SagaRun.objects.get(pk=run.pk).status == "compensating"


def call(*args) -> str:
    out = io.StringIO()
    call_command("saga", *args, stdout=out)
    return out.getvalue()


def test_manage_py_saga_list_show_resume_and_compensate():
    run = held_run()
    assert f"{run.pk:>7}  order" in call("list", "--needs-human")
    shown = call("show", str(run.pk))
    assert f"saga-{run.pk}-1-step" in shown and "card declined" in shown
    assert '"reservation_id": "r"' in shown
    with pytest.raises(CommandError, match="only held, needs-human or succeeded"):
        call("compensate", str(ORDER.start(order_id=45).pk), "--yes")
    out = call("resume", str(run.pk), "--yes", "--note", "fixed")
    assert out.startswith(f"Run {run.pk} is running: step 1 (tasks.orders.charge_payment) "
                          f"dispatched again as saga-{run.pk}-1-step.2")
    assert run.events.get().actor.startswith("cli")
    with pytest.raises(CommandError, match="no saga run with id 999999"):
        call("show", "999999")
