"""Secrets in payloads: masked on every page and in `dlq show`, revealed only with permission."""

from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.urls import reverse

from recovery.models import DeadLetter
from recovery.core.redaction import MASK

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def letter():
    return DeadLetter.objects.create(
        task_id="s-1", task_name="tasks.tasks.charge_payment", args=[7, 100],
        kwargs={}, headers={"headers": {"authorization": "Bearer sk_live_abc"}},
        raw_body='{"api_key": "ak_999"}', fingerprint="e" * 40,
    )


@pytest.fixture
def letter_with_kw_secret():
    # charge_payment(order_id, amount_cents): the secret travels in a nested dict here.
    return DeadLetter.objects.create(
        task_id="s-2", task_name="tasks.tasks.import_customer_row",
        args=[{"id": 3, "email": "a@b.c", "password": "hunter2"}], kwargs={},
        fingerprint="e" * 40,
    )


def login(client, *codenames):
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=("view_deadletter", *codenames)))
    client.force_login(user)
    return client


def test_detail_page_masks_secrets_for_a_viewer(client, letter, letter_with_kw_secret):
    c = login(client)
    for obj, secret in ((letter, "sk_live_abc"), (letter, "ak_999"), (letter_with_kw_secret, "hunter2")):
        page = c.get(reverse("admin:recovery_deadletter_change", args=[obj.pk]) + "?reveal=1")
        assert secret not in page.content.decode()
        assert MASK in page.content.decode()
    letter_with_kw_secret.refresh_from_db()
    assert letter_with_kw_secret.args[0]["password"] == "hunter2"  # stored as is


def test_a_user_with_the_reveal_permission_can_reveal(client, letter_with_kw_secret):
    c = login(client, "reveal_deadletter_secrets")
    url = reverse("admin:recovery_deadletter_change", args=[letter_with_kw_secret.pk])
    masked = c.get(url).content.decode()
    assert "hunter2" not in masked and "Reveal secrets" in masked
    assert "hunter2" in c.get(url + "?reveal=1").content.decode()


def test_replay_form_locks_a_secret_payload_for_users_who_cannot_reveal(client, broker,
                                                                         letter_with_kw_secret):
    c = login(client, "replay_deadletter", "change_deadletter")
    url = reverse("admin:recovery_deadletter_replay", args=[letter_with_kw_secret.pk])
    form = c.get(url).content.decode()
    assert "hunter2" not in form and "disabled" in form
    c.post(url, {"args": json.dumps([{"id": 3, "email": "a@b.c", "password": MASK}]),
                 "kwargs": "{}"})
    letter_with_kw_secret.refresh_from_db()
    # Replayed as stored: the mask was never saved over the real value.
    assert letter_with_kw_secret.args[0]["password"] == "hunter2"
    assert letter_with_kw_secret.status == DeadLetter.Status.REPLAYING
    [raw] = broker.lrange("celery", 0, -1)
    message = json.loads(raw)
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        import base64
        body = base64.b64decode(body)
    assert json.loads(body)[0] == [{"id": 3, "email": "a@b.c", "password": "hunter2"}]


def test_dlq_show_masks_unless_asked_to_reveal(letter_with_kw_secret):
    out = io.StringIO()
    call_command("dlq", "show", str(letter_with_kw_secret.pk), stdout=out)
    assert "hunter2" not in out.getvalue() and MASK in out.getvalue()
    out = io.StringIO()
    call_command("dlq", "show", str(letter_with_kw_secret.pk), "--reveal", stdout=out)
    assert "hunter2" in out.getvalue()
