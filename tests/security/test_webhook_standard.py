"""The escalation webhook as a receiver (and an eavesdropper) meets it: signed per the
Standard Webhooks specification, verified by that specification's own package over real
HTTP, never sent in clear or with a guessable secret."""

from __future__ import annotations

import base64
import secrets
import time

import pytest
from django.core.checks import Error
from standardwebhooks import Webhook, WebhookVerificationError

from recovery import checks
from recovery.observe import notify
from recovery.models import IncidentNotification
from recovery.store.parking import ParkRecord, park

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def webhook(settings, receiver):
    def apply(url=None, secret=SECRET, debug=True):
        # DEBUG lets the local receiver speak plain HTTP (a production URL is https://).
        settings.DEBUG = debug
        settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {
            "WEBHOOK_URL": url or receiver.url, "WEBHOOK_SECRET": secret,
            "THRESHOLD_LETTERS": 1, "EMAIL": False}}
    return apply


def open_incident() -> None:
    park(ParkRecord(task_id="charge-1", task_name="tasks.charge_card", kind="dependency",
                    reason="gave up", exception_type="HTTPError", exception_message="502",
                    args=[], kwargs={}, queue="payments"))


def error_ids(problems) -> list[str]:
    return [p.id for p in problems if isinstance(p, Error)]


def test_the_standard_webhooks_verifier_accepts_our_signature_over_http(webhook, receiver):
    # Given a webhook with a whsec_ secret
    webhook()
    # When an incident opens and its notification is delivered
    open_incident()
    assert notify.deliver_due() == 1
    # Then the receiver's Standard Webhooks library verifies what it got
    (request,) = receiver.received()
    headers = {name.lower(): value for name, value in request["headers"].items()}
    payload = Webhook(SECRET).verify(request["body"], headers)
    assert payload["type"] == "incident.opened"
    assert headers["webhook-id"] == payload["delivery_id"]  # the id to deduplicate on, signed
    assert headers["webhook-signature"].startswith("v1,")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    # and our own verifier agrees, with the same headers
    assert notify.verify_signature(SECRET, request["body"], headers)


def test_a_plain_secret_signs_with_its_own_bytes(webhook, receiver):
    plain = "a-plain-secret-of-at-least-32-bytes-long"
    webhook(secret=plain)
    open_incident()
    assert notify.deliver_due() == 1
    (request,) = receiver.received()
    assert Webhook(plain.encode()).verify(request["body"], request["headers"])


def test_a_tampered_replayed_or_foreign_message_does_not_verify(webhook, receiver):
    webhook()
    open_incident()
    notify.deliver_due()
    (request,) = receiver.received()
    body = request["body"]
    headers = {name.lower(): value for name, value in request["headers"].items()}
    assert notify.verify_signature(SECRET, body, headers)
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    assert not notify.verify_signature(other, body, headers)
    assert not notify.verify_signature(SECRET, body + b" ", headers)
    assert not notify.verify_signature(SECRET, body, {**headers, "webhook-id": "9999"})
    assert not notify.verify_signature(SECRET, body, headers,
                                       now=int(headers["webhook-timestamp"]) + 301)
    assert not notify.verify_signature(SECRET, body, {"webhook-id": headers["webhook-id"]})
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_an_http_url_outside_debug_fails_the_check_and_is_never_sent(webhook, receiver):
    # Given a production deployment whose webhook URL is plain HTTP
    webhook(debug=False)
    problems = checks.check_recovery_settings()
    # Then start-up reports it and says how to fix it
    assert "recovery.E026" in error_ids(problems)
    message = next(p for p in problems if p.id == "recovery.E026")
    assert "https://" in message.msg + message.hint
    # and delivery refuses to send the incident in clear, keeping it to retry
    open_incident()
    assert notify.deliver_due() == 0
    assert receiver.received() == []
    note = IncidentNotification.objects.get()
    assert note.status == IncidentNotification.Status.PENDING
    assert "https" in note.last_error


def test_a_short_secret_fails_the_check_and_is_never_used(webhook, receiver):
    for short in ("whsec_test_123", "s3cret", "whsec_" + base64.b64encode(b"x" * 31).decode()):
        webhook(secret=short)
        problems = checks.check_recovery_settings()
        assert "recovery.E026" in error_ids(problems), short
        message = next(p for p in problems if p.id == "recovery.E026")
        assert "32 bytes" in message.msg and "whsec_" in message.hint
        assert short not in message.msg + message.hint  # the check never prints the secret
    open_incident()
    assert notify.deliver_due() == 0
    assert receiver.received() == []
    assert "32 bytes" in IncidentNotification.objects.get().last_error


def test_a_good_https_webhook_passes_the_check(webhook):
    webhook(url="https://bridge.example.com/hooks", debug=False)
    assert "recovery.E026" not in error_ids(checks.check_recovery_settings())
