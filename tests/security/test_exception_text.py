"""Item 3: a task whose exception quotes its secret argument (``Declined(f"token
{card_token} declined")``) must not show that token anywhere a person looks.

The letters here are written straight into the table, as letters parked before the
scrub at storage were: every surface must still scrub them when it shows them. The
worker test at the end proves that new letters are stored scrubbed.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.management import call_command
from django.urls import reverse

from recovery.core.fingerprint import fingerprint
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.core.redaction import MASK
from tests.integration.harness import wait_for

from . import secret_tasks

pytestmark = pytest.mark.django_db(transaction=True)

TASK = secret_tasks.charge_card.name
TOK_POS = "tok_live_pos_4242"
TOK_KW = "tok_live_kw_5151"
TOK_NESTED = "tok_live_nested_6161"
TOKENS = (TOK_POS, TOK_KW, TOK_NESTED)
MESSAGE = f"token {TOK_POS} declined (kw {TOK_KW}, nested {TOK_NESTED})"
FINGERPRINT = "d" * 40


@pytest.fixture
def letter():
    letter = DeadLetter.objects.create(
        task_id="leak-1", task_name=TASK, args=[7, TOK_POS],
        kwargs={"card_token_kw": TOK_KW, "billing": {"card_token": TOK_NESTED, "zip": "75001"}},
        kind="permanent", permanent=True, exception_type="tests.security.secret_tasks.Declined",
        exception_message=MESSAGE,
        traceback=f'Traceback (most recent call last):\n  File "x.py", line 3\n'
                  f"tests.security.secret_tasks.Declined: {MESSAGE}\n",
        history=[{"attempt": 1, "at": "2026-12-05T10:00:00", "kind": "permanent",
                  "exception_type": "Declined", "exception_message": MESSAGE,
                  "delay_seconds": None}],
        fingerprint=FINGERPRINT,
    )
    DeadLetterEvent.objects.create(letter=letter, action="replay", actor="ops",
                                   note=f"retried {TOK_POS}", outcome=f"parked again: {MESSAGE}",
                                   before={"args": [7, TOK_POS], "kwargs": {}},
                                   after={"args": [7, TOK_POS], "kwargs": {}})
    return letter


def assert_no_token(text: str) -> None:
    leaked = [token for token in TOKENS if token in text]
    assert not leaked, f"leaked {leaked}"


def test_change_page_scrubs_message_traceback_history_and_audit_trail(staff_client, letter):
    page = staff_client().get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    assert page.status_code == 200
    assert_no_token(page.content.decode())
    assert MASK in page.content.decode()


def test_failure_groups_list_scrubs_the_sample_message(staff_client, letter):
    page = staff_client().get(reverse("admin:recovery_deadletter_groups"))
    assert page.status_code == 200 and "declined" in page.content.decode()
    assert_no_token(page.content.decode())


def test_failure_group_page_scrubs_the_sample_message(staff_client, letter):
    page = staff_client().get(reverse("admin:recovery_deadletter_group", args=[FINGERPRINT]))
    assert page.status_code == 200 and "declined" in page.content.decode()
    assert_no_token(page.content.decode())


def test_bulk_action_confirm_page_scrubs_messages(staff_client, letter):
    page = staff_client("discard_deadletter").post(
        reverse("admin:recovery_deadletter_changelist"),
        {"action": "discard_selected", "_selected_action": [letter.pk]})
    assert page.status_code == 200 and "declined" in page.content.decode()
    assert_no_token(page.content.decode())


@pytest.mark.parametrize("operation", ["discard", "resolve", "compensate"])
def test_single_letter_confirm_pages_scrub_the_message(staff_client, letter, operation):
    page = staff_client(f"{operation}_deadletter").get(
        reverse(f"admin:recovery_deadletter_{operation}", args=[letter.pk]))
    assert page.status_code == 200 and "declined" in page.content.decode()
    assert_no_token(page.content.decode())


def test_dashboard_scrubs_the_oldest_letter_and_top_failures(staff_client, letter):
    page = staff_client().get(reverse("admin:recovery_dashboard"))
    assert page.status_code == 200 and "declined" in page.content.decode()
    assert_no_token(page.content.decode())



@pytest.mark.parametrize("argv", [("list",), ("show", "{pk}"), ("export",),
                                  ("export", "--format", "csv")])
def test_dlq_commands_without_reveal_scrub_exception_text(letter, argv):
    out = io.StringIO()
    call_command("dlq", *[part.format(pk=letter.pk) for part in argv], stdout=out)
    text = out.getvalue()
    assert "declined" in text
    assert_no_token(text)
    if argv[-1] == "csv":
        [row] = list(csv.DictReader(io.StringIO(text)))
        assert MASK in row["exception_message"] and MASK in row["traceback"]


def test_dlq_export_reveal_still_shows_the_stored_text(letter):
    out = io.StringIO()
    call_command("dlq", "export", "--reveal", stdout=out)
    record = json.loads(out.getvalue())
    assert record["exception_message"] == MESSAGE  # the operator who may reveal sees it all


@pytest.mark.integration
def test_a_worker_stores_the_exception_text_already_scrubbed(start_worker):
    # Given a worker running a task whose exception quotes its card tokens
    start_worker(extra=("-I", "tests.security.secret_tasks"))
    # When it fails for good and is parked
    result = secret_tasks.charge_card.apply_async(
        args=[7, TOK_POS], kwargs={"card_token_kw": TOK_KW, "billing": {"card_token": TOK_NESTED}})
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 60,
                      message="dead letter")
    # Then the message, traceback and history are stored without the tokens (so search,
    # grouping and every surface are safe), the fingerprint is computed from that text,
    # and the payload keeps the real values for a replay.
    stored = letter.exception_message + letter.traceback + json.dumps(letter.history)
    assert_no_token(stored)
    assert letter.exception_message == f"token {MASK} declined (kw {MASK}, nested {MASK})"
    assert letter.fingerprint == fingerprint(TASK, letter.exception_type, letter.exception_message)
    assert letter.args == [7, TOK_POS] and letter.kwargs["billing"]["card_token"] == TOK_NESTED
    assert not DeadLetter.objects.filter(exception_message__contains="tok_live").exists()
