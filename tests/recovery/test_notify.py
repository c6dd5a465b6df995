"""recovery.observe.notify against a real HTTP receiver and a real SMTP server on localhost:
signed webhooks, retries with backoff, Retry-After, giving up, and the incident e-mail."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from recovery.observe import escalation, notify, webhook_signing
from recovery.observe.escalation import Occurrence
from recovery.models import Incident, IncidentNotification
from recovery.store.parking import ParkRecord, park

db = pytest.mark.django_db(transaction=True)
SECRET = "whsec_" + "c2VjcmV0LWtleS1vZi10aGlydHktdHdvLWJ5dGVzISE="  # 32 bytes


@pytest.fixture(autouse=True)
def _local_receivers_speak_http(settings):
    """The receivers here are plain-HTTP servers on localhost: only DEBUG allows that."""
    settings.DEBUG = True


@pytest.fixture
def channels(settings, receiver):
    def apply(**values):
        settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {
            "WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "THRESHOLD_LETTERS": 1,
            "ADMIN_BASE_URL": "https://ops.example.com", **values}}

    apply()
    return apply


def parked(n: int = 1) -> None:
    park(ParkRecord(
        task_id=f"charge-{n}", task_name="tasks.charge_card", kind="dependency",
        reason="gave up after 5 attempts", exception_type="requests.exceptions.HTTPError",
        exception_message="502 Bad Gateway", traceback="Traceback (most recent call last):\n",
        args=["tok_visa_4242"], kwargs={"amount": 10, "password": "hunter2"}, queue="payments",
        history=[{"attempt": 1, "replay": 0, "at": "2026-11-29T01:00:00+00:00",
                  "exception_type": "requests.exceptions.HTTPError",
                  "exception_message": "502 Bad Gateway", "kind": "dependency",
                  "delay_seconds": None}],
        failed_at=timezone.now().isoformat()))


def header(request: dict, name: str) -> str:
    """A header of a received request, by name in any case (as HTTP has it)."""
    return {key.lower(): value for key, value in request["headers"].items()}[name]


def make_due() -> None:
    IncidentNotification.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))


# -- signing ------------------------------------------------------------------------------------


def test_a_signature_verifies_only_for_the_same_secret_body_and_a_fresh_timestamp():
    body = b'{"type": "incident.opened"}'
    now = int(time.time())
    headers = webhook_signing.headers(SECRET, "42", body, now=now)
    assert headers["webhook-signature"].startswith("v1,")
    assert notify.verify_signature(SECRET, body, headers)
    assert not notify.verify_signature("whsec_b29vb29vb29vb29vb29vb29vb29vb29vb29vb29vb28=", body, headers)
    assert not notify.verify_signature(SECRET, body + b" ", headers)
    assert not notify.verify_signature(SECRET, body, {**headers, "webhook-timestamp": str(now - 1)})
    assert not notify.verify_signature(SECRET, body, headers, now=now + 301)
    assert not notify.verify_signature(SECRET, body, {**headers, "webhook-timestamp": "yesterday"})


# -- webhook ------------------------------------------------------------------------------------


@db
def test_an_opened_incident_is_posted_once_signed_with_its_diagnostics(channels, receiver):
    parked(1)
    parked(2)  # same fingerprint: adds to the incident, no second ticket

    assert notify.deliver_due() == 1
    assert notify.deliver_due() == 0

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    headers = {name.lower(): value for name, value in request["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert headers["x-recovery-event"] == "incident.opened"
    assert notify.verify_signature(SECRET, request["body"], headers)
    data = json.loads(request["body"])
    incident = Incident.objects.get()
    note = IncidentNotification.objects.get()
    assert headers["webhook-id"] == str(note.pk) == data["delivery_id"]
    assert data["type"] == "incident.opened"
    assert data["incident"]["id"] == incident.pk
    assert data["incident"]["count"] == 2
    assert data["incident"]["task"] == "tasks.charge_card"
    assert data["incident"]["letter_count"] == 2
    assert data["incident"]["url"] == (
        f"https://ops.example.com/admin/recovery/incident/{incident.pk}/change/")
    assert data["diagnostics"]["exception"] == {"type": "requests.exceptions.HTTPError",
                                                "message": "502 Bad Gateway"}
    assert b"hunter2" not in request["body"]
    assert data["diagnostics"]["kwargs"]["amount"] == 10
    note.refresh_from_db()
    assert (note.status, note.attempts, note.last_error) == ("sent", 1, "")
    assert note.sent_at is not None


@db
def test_a_failing_endpoint_is_retried_with_backoff_until_it_takes_the_ticket(channels, receiver):
    receiver.statuses = [(500, {}), (503, {})]
    parked()

    before = timezone.now()
    assert notify.deliver_due() == 0
    note = IncidentNotification.objects.get()
    assert (note.status, note.attempts) == ("pending", 1)
    assert note.last_error == "HTTP 500 from the webhook"
    assert note.next_attempt_at >= before + timedelta(seconds=1)
    assert notify.deliver_due() == 0  # not due yet: nothing sent
    assert len(receiver.requests) == 1

    make_due()
    assert notify.deliver_due() == 0
    note.refresh_from_db()
    assert (note.attempts, note.last_error) == (2, "HTTP 503 from the webhook")

    make_due()
    assert notify.deliver_due() == 1
    note.refresh_from_db()
    assert (note.status, note.attempts) == ("sent", 3)
    assert len(receiver.requests) == 3
    # One ticket, three attempts at it: the delivery id lets the receiver deduplicate.
    assert {header(r, "webhook-id") for r in receiver.requests} == {str(note.pk)}


@db
def test_retry_after_from_the_endpoint_is_honoured(channels, receiver):
    receiver.statuses = [(429, {"Retry-After": "120"})]
    parked()
    before = timezone.now()
    notify.deliver_due()
    note = IncidentNotification.objects.get()
    assert note.next_attempt_at >= before + timedelta(seconds=119)


@db
def test_delivery_gives_up_after_max_attempts(channels, receiver, caplog):
    channels(MAX_ATTEMPTS=2)
    receiver.statuses = [(500, {}), (500, {}), (500, {})]
    parked()
    notify.deliver_due()
    make_due()
    notify.deliver_due()
    note = IncidentNotification.objects.get()
    assert (note.status, note.attempts) == ("failed", 2)
    make_due()
    assert notify.deliver_due() == 0
    assert len(receiver.requests) == 2
    assert "gave up the webhook notification" in caplog.text


@db
def test_an_unreachable_endpoint_is_an_error_on_the_row_not_an_exception(channels, receiver):
    receiver.close()
    parked()
    assert notify.deliver_due() == 0
    note = IncidentNotification.objects.get()
    assert note.status == "pending"
    assert note.last_error.startswith("webhook unreachable")


@db
def test_a_resolved_incident_is_posted_as_resolved(channels, receiver):
    parked()
    notify.deliver_due()
    escalation.resolve(Incident.objects.get(), actor="carol", note="gateway fixed")
    assert notify.deliver_due() == 1
    data = json.loads(receiver.requests[-1]["body"])
    assert data["type"] == "incident.resolved"
    assert data["incident"]["status"] == "resolved"
    assert data["incident"]["resolved_by"] == "carol"


@db
def test_the_deliverer_thread_sends_without_being_asked(channels, receiver):
    channels(DELIVERY_INTERVAL_SECONDS=0.2)
    deliverer = notify.Deliverer().start()
    try:
        escalation.escalate(Occurrence(fingerprint="watchdog:outbox",
                                       reason=Incident.Reason.OUTBOX_STUCK,
                                       title="3 outbox messages unsent for 10 min"))
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        deliverer.stop()
    assert len(receiver.requests) == 1
    assert json.loads(receiver.requests[0]["body"])["incident"]["reason"] == "outbox_stuck"
    # The thread queued its count for the main thread (it never takes the metrics lock,
    # which a prefork worker's next fork would copy) and stop() recorded it.
    assert not notify._outcomes


@db
def test_the_deliverer_thread_leaves_its_counts_to_the_main_thread(channels, receiver,
                                                                   monkeypatch):
    recorded = []
    monkeypatch.setattr(notify.metrics, "notification_outcome",
                        lambda channel, outcome: recorded.append((channel, outcome)))
    channels(DELIVERY_INTERVAL_SECONDS=0.2)
    escalation.escalate(Occurrence(fingerprint="watchdog:replaying",
                                   reason=Incident.Reason.STUCK_REPLAY, title="2 replays lost"))
    thread = threading.Thread(target=notify.deliver_due, name="recovery-notify")
    thread.start()
    thread.join(10)
    assert recorded == []
    assert list(notify._outcomes) == [("webhook", "sent")]
    notify.flush_counts()
    assert recorded == [("webhook", "sent")]
    assert not notify._outcomes


# -- e-mail -------------------------------------------------------------------------------------


@pytest.fixture
def smtp(settings, smtp_server):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = smtp_server.port
    settings.ADMINS = [("On-call", "oncall@example.com")]
    return smtp_server.messages


@db
def test_admins_get_one_mail_per_incident_with_the_diagnostics(settings, smtp):
    settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {
        "THRESHOLD_LETTERS": 1, "ADMIN_BASE_URL": "https://ops.example.com"}}
    parked(1)
    parked(2)
    assert notify.deliver_due() == 1

    assert len(smtp) == 1
    mail = smtp[0]
    incident = Incident.objects.get()
    assert mail["To"] == "oncall@example.com"
    assert mail["Subject"].startswith(f"[Django] Incident #{incident.pk} opened: tasks.charge_card")
    body = mail.get_payload(decode=True).decode()
    assert f"https://ops.example.com/admin/recovery/incident/{incident.pk}/change/" in body
    assert "requests.exceptions.HTTPError: 502 Bad Gateway" in body
    assert "Traceback (most recent call last)" in body
    assert "Classified: dependency, transient: gave up after 5 attempts" in body
    assert "hunter2" not in body
    assert "#1 at 2026-11-29T01:00:00+00:00" in body


@db
def test_no_admins_means_no_mail_channel(settings):
    settings.ADMINS = []
    settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {"THRESHOLD_LETTERS": 1}}
    parked()
    assert Incident.objects.count() == 1
    assert not IncidentNotification.objects.exists()


@db
def test_a_refusing_mail_server_is_retried(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = 9  # nothing listens
    settings.EMAIL_TIMEOUT = 2
    settings.ADMINS = [("On-call", "oncall@example.com")]
    settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {"THRESHOLD_LETTERS": 1}}
    parked()
    assert notify.deliver_due() == 0
    note = IncidentNotification.objects.get()
    assert (note.channel, note.status, note.attempts) == ("email", "pending", 1)
    assert note.last_error.startswith("mail not sent")


# -- what a misbehaving channel cannot do -------------------------------------------------------


@db
def test_an_endpoint_that_answers_garbage_costs_an_attempt_and_blocks_nothing(settings):
    import socket as sockets

    garbage = sockets.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen(8)

    def answer():
        while True:
            try:
                conn, _ = garbage.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"garbage not http\r\n\r\n")
            conn.close()

    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {
        "WEBHOOK_URL": f"http://127.0.0.1:{garbage.getsockname()[1]}/",
        "WEBHOOK_SECRET": SECRET, "THRESHOLD_LETTERS": 1}}
    try:
        parked()
        assert notify.deliver_due() == 0
    finally:
        # shutdown() wakes the blocked accept(); close() alone would leave the port
        # listening with the thread, answering garbage to whoever binds it next
        garbage.shutdown(sockets.SHUT_RDWR)
        garbage.close()
        answering.join(5)
    note = IncidentNotification.objects.get()
    assert (note.status, note.attempts) == ("pending", 1)
    assert note.last_error.startswith("webhook answered badly: BadStatusLine")
    assert note.next_attempt_at > timezone.now()


@db
def test_a_resolution_never_overtakes_its_opening(channels, receiver):
    receiver.statuses = [(503, {})]
    parked()
    notify.deliver_due()  # "opened" fails once, backs off
    escalation.resolve(Incident.objects.get(), actor="dave")

    assert notify.deliver_due() == 0  # "resolved" waits for "opened"
    assert [json.loads(r["body"])["type"] for r in receiver.requests] == ["incident.opened"]

    make_due()
    assert notify.deliver_due() == 2
    assert [json.loads(r["body"])["type"] for r in receiver.requests] == [
        "incident.opened", "incident.opened", "incident.resolved"]


@db
def test_a_multi_line_exception_still_makes_a_one_line_subject(settings, smtp):
    settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {"THRESHOLD_LETTERS": 1}}
    park(ParkRecord(
        task_id="import-1", task_name="tasks.import_row", kind="data_integrity",
        reason="permanent failure", exception_type="django.db.utils.IntegrityError",
        exception_message='duplicate key value violates unique constraint "sku"\n'
                          "DETAIL:  Key (sku)=(A-1) already exists.",
        permanent=True, failed_at=timezone.now().isoformat()))
    assert notify.deliver_due() == 1
    subject = smtp[0]["Subject"]
    assert "\n" not in " ".join(subject.split("\r\n "))
    assert "DETAIL: Key (sku)=(A-1) already exists." in " ".join(subject.split())


@db
def test_a_secret_quoted_in_the_exception_never_reaches_the_webhook(channels, receiver):
    park(ParkRecord(
        task_id="sync-1", task_name="tasks.sync_account", kind="dependency",
        reason="permanent failure", exception_type="partner.AuthError",
        exception_message="token tok_live_8f3k2 rejected by partner",
        traceback='Traceback:\n  raise AuthError(f"token {api_token} rejected")\n'
                  "partner.AuthError: token tok_live_8f3k2 rejected by partner\n",
        kwargs={"account": 7, "api_token": "tok_live_8f3k2"}, permanent=True,
        history=[{"attempt": 1, "exception_message": "token tok_live_8f3k2 rejected"}],
        failed_at=timezone.now().isoformat()))
    notify.deliver_due()
    body = receiver.requests[0]["body"]
    assert b"tok_live_8f3k2" not in body
    incident = Incident.objects.get()
    assert "tok_live_8f3k2" not in incident.title + json.dumps(incident.details)
    assert json.loads(body)["diagnostics"]["exception"]["message"] == (
        "token •••••• rejected by partner")
