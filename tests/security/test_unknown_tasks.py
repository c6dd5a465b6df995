"""Item 6: a letter whose task the web process cannot import used to show its positional
arguments in clear; and the default secret keys missed card data, IBANs, PINs and the
like, while short keys matched as substrings would hide ``company`` or ``shipping``."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.urls import reverse

from recovery.models import DeadLetter
from recovery.core.redaction import MASK

pytestmark = pytest.mark.django_db(transaction=True)

SECRETS = {"cvv": "cvv_919", "iban": "DE89370400440532013000", "pin": "pin_8642",
           "otp": "otp_445566", "session_id": "sess_abcdef", "cardNumber": "4111111111111111",
           "pan": "pan_5500000000000004", "ssn": "ssn_078051120", "X-Auth-Key": "auth_k_1",
           "client_signature": "sig_deadbeef", "user_credentials": "cred_77"}
PLAIN = {"company": "ACME_co_1", "shipping": "express_ship_1", "author": "ada_author_1",
         "spinach": "green_1", "panel": "left_panel_1", "discard_reason": "dup_1"}


def show(letter) -> dict:
    out = io.StringIO()
    call_command("dlq", "show", str(letter.pk), stdout=out)
    return json.loads(out.getvalue())


def test_positional_arguments_of_an_unknown_task_are_all_masked(staff_client):
    letter = DeadLetter.objects.create(
        task_id="gone-1", task_name="billing.removed_module.charge",
        args=["tok_unknown_1234", {"nested": "deep_unknown_99"}],
        kwargs={"note": "visible_note", "password": "pw_unknown"}, fingerprint="a" * 40)
    page = staff_client().get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    text = page.content.decode()
    assert page.status_code == 200
    assert "tok_unknown_1234" not in text and "deep_unknown_99" not in text
    assert "pw_unknown" not in text and "visible_note" in text
    assert show(letter)["args"] == [MASK, MASK]


def test_default_secret_keys_cover_card_data_and_short_keys_match_whole_words(staff_client):
    letter = DeadLetter.objects.create(
        task_id="keys-1", task_name="billing.removed_module.charge", args=[],
        kwargs={**SECRETS, **PLAIN}, fingerprint="b" * 40)
    text = staff_client().get(
        reverse("admin:recovery_deadletter_change", args=[letter.pk])).content.decode()
    assert [v for v in SECRETS.values() if v in text] == []
    assert [v for v in PLAIN.values() if v not in text] == []
    assert show(letter)["kwargs"] == {**{k: MASK for k in SECRETS}, **PLAIN}
