"""Item 4 (display): poison, timeout and worker-lost letters keep the message as it came
(headers with ``argsrepr``/``kwargsrepr``, the raw body with the arguments). Masking by
key name alone missed all of it. The letters are parked here by the worker's own
``park_poison``, the way a worker parks them.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from celery.exceptions import WorkerLostError
from django.core.management import call_command
from django.urls import reverse
from kombu.exceptions import DecodeError

from recovery.models import DeadLetter
from recovery.core.redaction import MASK
from recovery.delivery.worker import park_poison

from . import secret_tasks

pytestmark = pytest.mark.django_db(transaction=True)

TASK = secret_tasks.charge_card.name
TOK = "tok_live_poison_4242"
TOK_KW = "tok_live_poison_kw_5151"


def protocol2_headers(task_id: str) -> dict:
    return {"lang": "py", "task": TASK, "id": task_id, "root_id": task_id, "retries": 0,
            "argsrepr": f"(7, '{TOK}')", "kwargsrepr": f"{{'card_token_kw': '{TOK_KW}'}}",
            "origin": "gen1@host"}


def park(task_id: str, body, content_type: str = "application/json", headers=None,
         exc=None) -> DeadLetter:
    park_poison(task_id=task_id, task_name=TASK, body=body, content_type=content_type,
                headers=headers if headers is not None else protocol2_headers(task_id),
                delivery_info={"routing_key": "celery"},
                exc=exc or WorkerLostError("worker lost"), reason="delivered 6 times (cap 5)")
    return DeadLetter.objects.get(task_id=task_id)


@pytest.fixture
def protocol2_letter():
    body = json.dumps([[7, TOK], {"card_token_kw": TOK_KW},
                       {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return park("p2-1", body.encode())


@pytest.fixture
def protocol1_letter():
    body = json.dumps({"task": TASK, "id": "p1-1", "args": [7, TOK],
                       "kwargs": {"card_token_kw": TOK_KW}, "retries": 0})
    return park("p1-1", body.encode(), headers={})


@pytest.fixture
def undecodable_letter():
    # A pickle-like body no JSON reader decodes, holding the token in its bytes.
    body = b"\x80\x04\x95" + TOK.encode() + b"\x94."
    return park("u-1", body, content_type="application/x-python-serialize",
                exc=DecodeError("cannot decode"))


def page(client, letter, reveal: bool = False) -> str:
    response = client.get(reverse("admin:recovery_deadletter_change", args=[letter.pk])
                          + ("?reveal=1" if reveal else ""))
    assert response.status_code == 200
    return response.content.decode()


def shown(letter, *extra) -> str:
    out = io.StringIO()
    call_command("dlq", "show", str(letter.pk), *extra, stdout=out)
    return out.getvalue()


def test_protocol2_letter_masks_argsrepr_kwargsrepr_and_body_by_signature(staff_client,
                                                                         protocol2_letter):
    text = page(staff_client(), protocol2_letter)
    assert TOK not in text and TOK_KW not in text
    assert "argsrepr" in text and MASK in text
    data = json.loads(shown(protocol2_letter))
    assert TOK not in json.dumps(data) and TOK_KW not in json.dumps(data)
    assert data["headers"]["argsrepr"] == repr((7, MASK))
    assert json.loads(data["raw_body"])[0] == [7, MASK]


def test_protocol1_letter_masks_the_dict_body_by_signature(staff_client, protocol1_letter):
    text = page(staff_client(), protocol1_letter)
    assert TOK not in text and TOK_KW not in text
    data = json.loads(shown(protocol1_letter))
    assert json.loads(data["raw_body"])["args"] == [7, MASK]


def test_undecodable_body_is_hidden_from_users_who_cannot_reveal(staff_client,
                                                                 undecodable_letter):
    text = page(staff_client(), undecodable_letter)
    assert TOK not in text
    assert "not decodable: hidden because it may hold secrets" in text
    assert TOK not in shown(undecodable_letter)


def test_undecodable_body_is_shown_to_a_user_who_reveals(staff_client, undecodable_letter):
    text = page(staff_client("reveal_deadletter_secrets"), undecodable_letter, reveal=True)
    assert TOK in text
    assert TOK in shown(undecodable_letter, "--reveal")


def test_base64_stored_body_with_nul_is_hidden_too(staff_client):
    letter = park("nul-1", b'["' + TOK.encode() + b'\x00"]')
    assert letter.raw_body.startswith("base64:")
    assert TOK.encode() in base64.b64decode(letter.raw_body[len("base64:"):])
    text = page(staff_client(), letter)
    assert "not decodable: hidden" in text and letter.raw_body[7:40] not in text


def test_masked_export_of_poison_letters_hides_the_tokens(protocol2_letter, protocol1_letter,
                                                          undecodable_letter):
    for fmt in ("jsonl", "csv"):
        out = io.StringIO()
        call_command("dlq", "export", "--format", fmt, stdout=out)
        assert TOK not in out.getvalue() and TOK_KW not in out.getvalue()


def test_a_retry_history_in_a_poison_letters_headers_is_scrubbed(staff_client):
    # Given a retried message whose recovery_history quotes the token the task raised about,
    # parked as poison (say on a worker of a rolling deploy that lacks the task)
    task_id = "p2-hist"
    headers = {**protocol2_headers(task_id), "recovery_history": [
        {"attempt": 1, "exception_type": "Declined",
         "exception_message": f"token {TOK} declined", "delay_seconds": 1.0}]}
    body = json.dumps([[7, TOK], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                      "chord": None}])
    letter = park(task_id, body.encode(), headers=headers)
    # Then the stored history holds the text already scrubbed (argsrepr stays as it came:
    # for an undecodable body it is all a revealing operator has; pages mask it)
    assert TOK not in json.dumps(letter.headers["recovery_history"])
    assert "declined" in json.dumps(letter.headers["recovery_history"])
    # and even a letter stored before that (written here as is) shows nothing of it
    DeadLetter.objects.filter(pk=letter.pk).update(headers=headers)
    letter.refresh_from_db()
    assert TOK not in page(staff_client(), letter)
    out = io.StringIO()
    call_command("dlq", "show", str(letter.pk), stdout=out)
    assert TOK not in out.getvalue()
