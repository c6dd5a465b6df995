"""Hostile input on display: a payload nested 10,000 deep (a RecursionError in every
recursive walk, and in ``json.loads``, which is not a ValueError), a 5 MB payload and a
1 MB exception message. Every surface answers, bounded, and nothing is lost."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.db import connection
from django.urls import reverse

from recovery.observe import escalation
from recovery.core import redaction
from recovery.models import DeadLetter
from recovery.store.parking import ParkRecord
from recovery.core.redaction import MASK

from . import secret_tasks

pytestmark = pytest.mark.django_db(transaction=True)

DEPTH = 10_000
DEEP_JSON = '{"card_token": "tok_deep_1", "a": ' + "[" * DEPTH + '"bottom_secret"' + "]" * DEPTH + "}"


def deep_list(depth: int = DEPTH, leaf="bottom_secret"):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def deep_letter():
    letter = DeadLetter.objects.create(task_id="deep-1", task_name=secret_tasks.charge_card.name,
                                       args=[], kwargs={}, fingerprint="c" * 40,
                                       raw_body=DEEP_JSON, content_type="application/json")
    # The ORM cannot write it (json.dumps recurses too): PostgreSQL takes the text as is.
    with connection.cursor() as cursor:
        cursor.execute("UPDATE recovery_deadletter SET kwargs = %s::jsonb, headers = %s::jsonb "
                       "WHERE id = %s", [DEEP_JSON, DEEP_JSON, letter.pk])
    return letter


def test_masking_a_payload_nested_ten_thousand_deep_stops_at_the_depth_limit():
    masked = redaction.mask({"a": deep_list()})
    depth, value = 0, masked["a"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert value == redaction.MASK and depth < redaction.MAX_DEPTH
    assert redaction.hidden_values({"a": deep_list()}, masked) == ["bottom_secret"]


@pytest.mark.parametrize("codenames,query", [((), ""), (("reveal_deadletter_secrets",), "?reveal=1")])
def test_change_page_of_a_deep_letter_renders(staff_client, deep_letter, codenames, query):
    page = staff_client(*codenames).get(
        reverse("admin:recovery_deadletter_change", args=[deep_letter.pk]) + query)
    assert page.status_code == 200
    text = page.content.decode()
    if query:  # who may reveal sees the values, the payload cut at the depth limit
        assert "tok_deep_1" in text and "nested deeper than" in text
    else:
        assert "tok_deep_1" not in text and "bottom_secret" not in text and MASK in text


def test_dlq_show_and_export_of_a_deep_letter_work(deep_letter):
    for argv in (("show", str(deep_letter.pk)), ("export",), ("export", "--format", "csv")):
        out = io.StringIO()
        call_command("dlq", *argv, stdout=out)
        assert "deep-1" in out.getvalue() and "tok_deep_1" not in out.getvalue()


def test_the_stored_deep_payload_is_kept_whole(deep_letter):
    deep_letter = DeadLetter.objects.get(pk=deep_letter.pk)
    value = deep_letter.kwargs["a"]
    for _ in range(DEPTH):
        value = value[0]
    assert value == "bottom_secret"


def test_escalation_diagnostics_of_a_deep_payload_work():
    record = ParkRecord(task_id="deep-2", task_name=secret_tasks.charge_card.name,
                        kind="permanent", reason="declined", exception_message="declined")
    record.kwargs = {"billing": deep_list()}  # as a spool record may hold it
    record.raw_body = DEEP_JSON
    details = escalation.letter_diagnostics(record, letter_id=None)
    assert "bottom_secret" not in json.dumps(details)


def test_a_five_megabyte_payload_and_a_megabyte_message_render_truncated(staff_client):
    big = "x" * (5 * 1024 * 1024)
    letter = DeadLetter.objects.create(task_id="big-1", task_name=secret_tasks.charge_card.name,
                                       args=[7, "tok_small", big], kwargs={},
                                       exception_message="m" * (1024 * 1024),
                                       fingerprint="e" * 40)
    page = staff_client().get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    assert page.status_code == 200
    text = page.content.decode()
    assert "truncated; full value via dlq export --reveal" in text
    assert len(text) < 1024 * 1024


@pytest.mark.parametrize("codenames", [("replay_deadletter",),
                                       ("replay_deadletter", "reveal_deadletter_secrets",
                                        "change_deadletter")])
def test_the_replay_form_of_a_deep_letter_renders_and_refuses_editing(
        staff_client, deep_letter, codenames):
    # Given a letter whose kwargs are nested 10,000 deep, and an operator who may replay
    # (and, the second time, reveal and edit)
    client = staff_client(*codenames)
    url = reverse("admin:recovery_deadletter_replay", args=[deep_letter.pk])
    # When they open its replay form
    page = client.get(url)
    # Then it renders, with the payload locked and the reason said
    assert page.status_code == 200
    text = page.content.decode()
    assert "too deep or too large to edit here" in text
    assert "bottom_secret" not in text
    # and posting an "edit" changes nothing: the payload is replayed as stored, or refused
    # with a clear error, never a 500
    response = client.post(url, {"args": "[]", "kwargs": '{"x": 1}', "queue": "", "note": ""})
    assert response.status_code in (200, 302)
    deep_letter.refresh_from_db()
    assert deep_letter.kwargs["card_token"] == "tok_deep_1"  # stored payload untouched
    assert deep_letter.args == []


def test_the_replay_form_of_a_five_megabyte_letter_is_not_a_five_megabyte_page(staff_client):
    letter = DeadLetter.objects.create(task_id="big-form-1", task_name=secret_tasks.charge_card.name,
                                       args=["z" * (5 * 1024 * 1024)], kwargs={},
                                       fingerprint="d" * 40)
    page = staff_client("replay_deadletter", "reveal_deadletter_secrets").get(
        reverse("admin:recovery_deadletter_replay", args=[letter.pk]))
    assert page.status_code == 200
    assert len(page.content) < 1024 * 1024
    assert "too deep or too large to edit here" in page.content.decode()
