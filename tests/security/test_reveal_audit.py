"""Reveals leave a trace: every way of seeing a letter's secrets unmasked (the change page
with ``?reveal=1``, the unlocked replay form, ``dlq show --reveal``, ``dlq export
--reveal``) writes one ``revealed`` audit event naming who and which letter. A masked view
writes none, and asking for ``?reveal=1`` without the permission shows masked data."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from dlq_admin.management.actor import cli_actor
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.core.redaction import MASK
from recovery.operations.replay import mark_replay_succeeded

from .staff_users import staff  # noqa: F401 - the fixture

pytestmark = pytest.mark.django_db

SECRET = "hunter2"
REVEALED = "revealed"


def secret_letter(n: int = 1) -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=f"rv-{n}", task_name="tasks.tasks.import_customer_row",
        args=[{"id": n, "email": "a@b.c", "password": SECRET}], kwargs={},
        fingerprint="e" * 40)


def plain_letter() -> DeadLetter:
    return DeadLetter.objects.create(task_id="rv-plain", task_name="tasks.tasks.fetch_exchange_rate",
                                     args=["EUR"], kwargs={}, fingerprint="f" * 40)


def reveals() -> list[tuple[int, str]]:
    return list(DeadLetterEvent.objects.filter(action=REVEALED)
                .order_by("letter_id").values_list("letter_id", "actor"))


def change_page(letter: DeadLetter) -> str:
    return reverse("admin:recovery_deadletter_change", args=[letter.pk])


def test_revealing_on_the_change_page_writes_one_event_naming_the_user(staff):
    letter = secret_letter()
    c = staff("view_deadletter", "reveal_deadletter_secrets")
    page = c.get(change_page(letter), {"reveal": "1"})
    assert page.status_code == 200 and SECRET in page.content.decode()
    assert reveals() == [(letter.pk, "staff0")]


def test_the_masked_change_page_writes_no_event(staff):
    letter = secret_letter()
    c = staff("view_deadletter", "reveal_deadletter_secrets")
    page = c.get(change_page(letter))
    assert SECRET not in page.content.decode()
    assert reveals() == []


def test_asking_to_reveal_without_the_permission_shows_masked_data_and_writes_nothing(staff):
    letter = secret_letter()
    c = staff("view_deadletter")
    page = c.get(change_page(letter), {"reveal": "1"})
    assert page.status_code == 200
    assert SECRET not in page.content.decode() and MASK in page.content.decode()
    assert reveals() == []


def test_revealing_a_letter_without_secrets_writes_no_event(staff):
    letter = plain_letter()
    c = staff("view_deadletter", "reveal_deadletter_secrets")
    assert c.get(change_page(letter), {"reveal": "1"}).status_code == 200
    assert reveals() == []


def test_the_unlocked_replay_form_is_a_reveal(staff):
    letter = secret_letter()
    c = staff("view_deadletter", "replay_deadletter", "change_deadletter",
              "reveal_deadletter_secrets")
    page = c.get(reverse("admin:recovery_deadletter_replay", args=[letter.pk]))
    assert page.status_code == 200 and SECRET in page.content.decode()
    assert reveals() == [(letter.pk, "staff0")]


def test_the_locked_replay_form_writes_no_event(staff):
    letter = secret_letter()
    c = staff("view_deadletter", "replay_deadletter", "change_deadletter")
    page = c.get(reverse("admin:recovery_deadletter_replay", args=[letter.pk]))
    assert page.status_code == 200 and SECRET not in page.content.decode()
    assert reveals() == []


def test_dlq_show_reveal_writes_one_event_for_the_shell_user():
    letter = secret_letter()
    out = io.StringIO()
    call_command("dlq", "show", str(letter.pk), "--reveal", stdout=out)
    assert SECRET in out.getvalue()
    assert reveals() == [(letter.pk, cli_actor())]


def test_dlq_show_masked_writes_no_event():
    letter = secret_letter()
    out = io.StringIO()
    call_command("dlq", "show", str(letter.pk), stdout=out)
    assert SECRET not in out.getvalue()
    assert reveals() == []


def test_dlq_export_reveal_writes_one_event_per_exported_letter():
    letters = [secret_letter(n) for n in range(1, 6)]
    out = io.StringIO()
    call_command("dlq", "export", "--reveal", "--limit", "3", stdout=out, stderr=io.StringIO())
    exported = [json.loads(line)["id"] for line in out.getvalue().splitlines()]
    assert len(exported) == 3 and SECRET in out.getvalue()
    assert reveals() == [(pk, cli_actor()) for pk in sorted(exported)]
    assert set(exported) < {letter.pk for letter in letters}


def test_dlq_export_masked_writes_no_event():
    secret_letter()
    out = io.StringIO()
    call_command("dlq", "export", stdout=out, stderr=io.StringIO())
    assert SECRET not in out.getvalue()
    assert reveals() == []


def test_a_reveal_changes_nothing_in_the_letters_lifecycle():
    """A letter the watchdog gave up for lost is resolved when its replay reports back late,
    if nothing happened to it since: an operator reading it (a reveal) is not something
    happening to it."""
    letter = secret_letter()
    DeadLetter.objects.filter(pk=letter.pk).update(
        last_failed_at=timezone.now() - timedelta(minutes=5))
    DeadLetterEvent.objects.create(letter=letter, action=DeadLetterEvent.Action.REPLAY_LOST,
                                   actor="watchdog", at=timezone.now() - timedelta(minutes=1))
    call_command("dlq", "show", str(letter.pk), "--reveal", stdout=io.StringIO())
    assert mark_replay_succeeded(letter.task_id) == 1
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RESOLVED
