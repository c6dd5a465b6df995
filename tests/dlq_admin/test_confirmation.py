"""The confirm-then-act flow every operator admin shares (dlq_admin/confirmation.py), checked
on each of them: dead letters, incidents, saga runs. Django test client, real PostgreSQL;
nothing here publishes a message (the operations that run do not publish)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
from django.contrib import admin
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from dlq_admin import confirmation
from recovery.models import DeadLetter, DeadLetterEvent, Incident, SagaEvent, SagaRun
from recovery.core.redaction import MASK
from tests.security import secret_tasks
from tests.security.test_saga_secrets import HELD, QUOTING, SECRETS, run_through_step_1

pytestmark = pytest.mark.django_db


def letter(status: str = DeadLetter.Status.PARKED) -> DeadLetter:
    return DeadLetter.objects.create(task_id=f"t-{DeadLetter.objects.count()}",
                                     task_name="tasks.tasks.charge_payment", args=[1, 500],
                                     fingerprint="d" * 40, exception_type="DependencyError",
                                     exception_message="card declined", status=status)


def incident(status: str = Incident.Status.OPEN) -> Incident:
    return Incident.objects.create(fingerprint=f"fp-{Incident.objects.count()}",
                                   reason=Incident.Reason.CRITICAL_TASK, status=status,
                                   title="Critical task failed: card declined")


def saga_run(status: str = SagaRun.Status.HELD) -> SagaRun:
    return SagaRun.objects.create(name="order", status=status, context={"order_id": 1},
                                  definition={"steps": []}, error="step 1 failed")


@dataclass(frozen=True)
class Admin:
    """One admin's side of the flow: how to make an object, an operation that changes
    nothing outside the database, and what its pages call things."""

    model_name: str
    make: Callable
    operation: str
    elsewhere: str  # a status the operation does not act on
    item: str  # "This <item> is not ..."
    state: str  # "... is not <state>"

    @property
    def permission(self) -> str:
        return f"{self.operation}_{self.model_name}"

    @property
    def view(self) -> str:
        return f"view_{self.model_name}"

    def url(self, pk) -> str:
        return reverse(f"admin:recovery_{self.model_name}_{self.operation}", args=[pk])

    @property
    def changelist(self) -> str:
        return reverse(f"admin:recovery_{self.model_name}_changelist")


ADMINS = [
    Admin("deadletter", letter, "discard", DeadLetter.Status.DISCARDED, "letter", "parked"),
    Admin("incident", incident, "acknowledge", Incident.Status.RESOLVED, "incident", "open"),
    Admin("sagarun", saga_run, "compensate", SagaRun.Status.RUNNING, "run",
          "held, needs_human, succeeded"),
]
each_admin = pytest.mark.parametrize("side", ADMINS, ids=[a.model_name for a in ADMINS])


def log_in(client: Client, *codenames: str) -> Client:
    user = get_user_model().objects.create_user(f"op{get_user_model().objects.count()}",
                                                password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="recovery",
                                                         codename__in=codenames))
    client.force_login(user)
    return client


def bulk(client: Client, side: Admin, objects, follow: bool = False, **extra):
    return client.post(side.changelist, {"action": f"{side.operation}_selected",
                                         helpers.ACTION_CHECKBOX_NAME: [o.pk for o in objects],
                                         **extra}, follow=follow)


def snapshot() -> tuple:
    """Every row the operations could change or write."""
    return (list(DeadLetter.objects.order_by("pk").values()),
            list(Incident.objects.order_by("pk").values()),
            list(SagaRun.objects.order_by("pk").values()),
            DeadLetterEvent.objects.count(), SagaEvent.objects.count())


# -- permissions, re-checked on every request ------------------------------------------------


@each_admin
def test_without_the_operation_permission_a_posted_confirmation_changes_nothing(client, side):
    # Given an object the operation applies to, and a user who may only view it
    obj = side.make()
    log_in(client, side.view)
    before = snapshot()
    # When they post the confirmation straight to the object's URL and to the change list
    # Then the object's URL answers 403, and the action is not run
    assert client.get(side.url(obj.pk)).status_code == 403
    assert client.post(side.url(obj.pk), {"post": "yes", "note": "x"}).status_code == 403
    response = bulk(client, side, [obj], post="yes", note="x")
    assert response.status_code in (200, 302)
    assert snapshot() == before


@each_admin
def test_without_the_view_permission_the_operation_url_is_forbidden(client, side):
    obj = side.make()
    log_in(client, side.permission)
    before = snapshot()
    assert client.get(side.url(obj.pk)).status_code == 403
    assert client.post(side.url(obj.pk), {"post": "yes"}).status_code == 403
    assert snapshot() == before


@each_admin
def test_an_id_that_names_nothing_is_404_but_only_for_a_user_who_may_act(client, side):
    log_in(client, side.view, side.permission)
    assert client.get(side.url(10**9)).status_code == 404
    assert client.get(side.url(10**20)).status_code == 404  # larger than the column
    client.logout()
    log_in(client, side.view)
    assert client.get(side.url(10**9)).status_code == 403  # says nothing about existence


@each_admin
def test_a_confirmation_posted_without_its_csrf_token_is_refused(side):
    obj = side.make()
    client = log_in(Client(enforce_csrf_checks=True), side.view, side.permission)
    before = snapshot()
    assert client.post(side.url(obj.pk), {"post": "yes"}).status_code == 403
    assert bulk(client, side, [obj], post="yes").status_code == 403
    assert snapshot() == before


# -- the page -----------------------------------------------------------------------------


@each_admin
def test_the_confirmation_page_offers_the_form_and_changes_nothing(client, side):
    obj = side.make()
    log_in(client, side.view, side.permission)
    before = snapshot()
    page = client.get(side.url(obj.pk))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="post" value="yes"' in html and f'value="Yes, {side.operation}"' in html
    assert 'name="note"' in html and 'name="action"' not in html
    change = reverse(f"admin:recovery_{side.model_name}_change", args=[obj.pk])
    assert f'href="{change}" class="button cancel-link"' in html  # back to the object
    assert snapshot() == before


@each_admin
def test_an_object_the_operation_does_not_apply_to_gets_no_form(client, side):
    obj = side.make(side.elsewhere)
    log_in(client, side.view, side.permission)
    html = client.get(side.url(obj.pk)).content.decode()
    assert (f"This {side.item} is not {side.state}: there is nothing to {side.operation}."
            in html)
    assert 'name="post"' not in html


@each_admin
def test_a_bulk_page_lists_the_first_objects_and_counts_the_rest(client, side, monkeypatch):
    monkeypatch.setattr(confirmation, "ROWS_SHOWN", 2)
    objects = [side.make() for _ in range(5)]
    log_in(client, side.view, side.permission)
    html = bulk(client, side, objects).content.decode()
    assert f"You are about to {side.operation} 5 " in html
    assert "… and 3 more" in html
    assert html.count(f'name="{helpers.ACTION_CHECKBOX_NAME}"') == 5  # all posted back


@each_admin
def test_a_note_that_cannot_be_stored_is_refused_and_nothing_runs(client, side):
    obj = side.make()
    log_in(client, side.view, side.permission)
    before = snapshot()
    refused = "The note contains a NUL character, which cannot be stored; nothing was done."
    for response in (client.post(side.url(obj.pk), {"post": "yes", "note": "a\x00b"},
                                 follow=True),
                     bulk(client, side, [obj], post="yes", note="a\x00b", follow=True)):
        assert [str(m) for m in response.context["messages"]] == [refused]
    assert snapshot() == before


def test_a_saga_bulk_action_over_its_limit_says_it_acts_on_the_first_ones(client, monkeypatch):
    monkeypatch.setattr(admin.site._registry[SagaRun], "bulk_max", 2)
    runs = [saga_run() for _ in range(3)]
    log_in(client, "view_sagarun", "compensate_sagarun")
    html = bulk(client, ADMINS[2], runs).content.decode()
    assert "3 saga runs are selected; one action acts on at most 2: the first 2 by id" in html
    assert "You are about to compensate 2 saga runs." in html


# -- masking: a confirmation page never reveals -------------------------------------------


REVEALER = ("reveal_deadletter_secrets",)


def test_a_letters_confirmation_page_masks_its_secret_even_for_a_user_who_may_reveal(client):
    token = "tok_live_confirm_4242"
    quoted = DeadLetter.objects.create(
        task_id="leak-1", task_name=secret_tasks.charge_card.name, args=[7, token],
        fingerprint="d" * 40, exception_type="Declined",
        exception_message=f"token {token} declined")
    log_in(client, "view_deadletter", "discard_deadletter", *REVEALER)
    for page in (client.get(reverse("admin:recovery_deadletter_discard", args=[quoted.pk]),
                            {"reveal": "1"}),
                 client.post(reverse("admin:recovery_deadletter_changelist"),
                             {"action": "discard_selected",
                              helpers.ACTION_CHECKBOX_NAME: [quoted.pk]})):
        html = page.content.decode()
        assert page.status_code == 200 and "declined" in html and MASK in html
        assert token not in html


def test_a_runs_confirmation_page_masks_its_secrets_even_for_a_user_who_may_reveal(client):
    # Given a held run whose stored error predates scrubbing and quotes its secrets
    run = run_through_step_1(HELD)
    SagaRun.objects.filter(pk=run.pk).update(error=f"step 1 failed: {QUOTING}")
    log_in(client, "view_sagarun", "resume_sagarun", *REVEALER)
    # When a user who may reveal secrets opens its confirmation page, asking to reveal
    page = client.get(reverse("admin:recovery_sagarun_resume", args=[run.pk]), {"reveal": "1"})
    # Then the page shows the error masked, and records no reveal
    html = page.content.decode()
    assert page.status_code == 200 and "declined for" in html
    for secret in SECRETS:
        assert secret not in html
    assert not run.events.filter(action="revealed").exists()


# -- the message ------------------------------------------------------------------------------


def test_an_operation_that_cannot_run_says_why_in_its_one_message(client):
    run = saga_run(SagaRun.Status.RUNNING)
    log_in(client, "view_sagarun", "resume_sagarun")
    before = snapshot()
    response = client.post(reverse("admin:recovery_sagarun_resume", args=[run.pk]),
                           {"post": "yes"}, follow=True)
    [message] = response.context["messages"]
    assert str(message).startswith("0 saga runs were resumed. 1 could not be: ")
    assert message.level_tag == "warning"
    assert snapshot() == before
