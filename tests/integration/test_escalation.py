"""Escalation on real worker processes: one signed ticket per open incident however often
the threshold is crossed, a failing or hanging webhook that is retried and never holds up
parking, and the incident e-mail through a real SMTP server."""

from __future__ import annotations

import json
import time

import pytest

from recovery.observe import notify
from recovery.models import DeadLetter, Incident, IncidentNotification

from . import worker_tasks as t
from .harness import wait_for
from ..brokers import broker_independent

pytestmark = [pytest.mark.integration, broker_independent]  # tickets and e-mail
SECRET = "whsec_" + "aW50ZWdyYXRpb24tc2VjcmV0LW9mLTMyLWJ5dGVzISE="  # 32 bytes


def escalation_env(receiver, **rules) -> dict:
    # DJANGO_DEBUG: only DEBUG lets a worker post to this plain-HTTP receiver on localhost.
    return {"DJANGO_DEBUG": "1", "RECOVERY_TEST_ESCALATION": json.dumps({
        "WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "THRESHOLD_LETTERS": 3,
        "THRESHOLD_MINUTES": 10, "DELIVERY_INTERVAL_SECONDS": 0.3, "MAX_BACKOFF_SECONDS": 1,
        "ADMIN_BASE_URL": "https://ops.example.com", **rules})}


def test_one_signed_ticket_per_open_incident_even_when_the_endpoint_fails_first(
        start_worker, receiver, key):
    # Given a webhook that answers 500 twice before it takes a ticket, and a worker whose
    # rule opens an incident at 3 letters of one failure
    receiver.statuses = [(500, {}), (500, {})]
    start_worker(env=escalation_env(receiver))

    # When twelve orders are declined: the threshold is crossed again and again
    results = [t.declined.delay(key, order_id) for order_id in range(1000, 1012)]

    # Then every task is parked, the failing webhook held none of them up
    wait_for(lambda: DeadLetter.objects.filter(task_id__in=[r.id for r in results]).count() == 12,
             30, message="12 dead letters")
    # and one incident collects them all (opened by the 3rd letter)
    # and one incident collects them all: opened by the 3rd letter with the two before it
    incident = wait_for(lambda: Incident.objects.filter(count=12).first(), 10,
                        message="the incident to collect the 12 letters")
    assert Incident.objects.count() == 1
    assert incident.reason == Incident.Reason.THRESHOLD
    assert incident.letters.count() == 12
    # and the ticket arrives after two failed attempts, once
    wait_for(lambda: IncidentNotification.objects.filter(status="sent").exists(), 20,
             message="the ticket to be delivered")
    time.sleep(1.5)  # a second ticket would come within the delivery interval
    requests = receiver.received()
    assert len(requests) == 3
    assert {{k.lower(): v for k, v in r["headers"].items()}["webhook-id"] for r in requests} == {
        str(IncidentNotification.objects.get().pk)}
    final = requests[-1]
    assert notify.verify_signature(SECRET, final["body"], final["headers"])
    ticket = json.loads(final["body"])
    assert ticket["type"] == "incident.opened"
    assert ticket["incident"]["id"] == incident.pk
    assert ticket["incident"]["task"] == "tests.integration.worker_tasks.declined"
    assert ticket["incident"]["url"].startswith("https://ops.example.com/admin/recovery/incident/")
    assert "card declined for order" in ticket["diagnostics"]["exception"]["message"]
    assert ticket["diagnostics"]["traceback"].startswith("Traceback")
    assert ticket["diagnostics"]["classification"]["permanent"] is True
    note = IncidentNotification.objects.get()
    assert (note.status, note.attempts) == ("sent", 3)


def test_a_hanging_webhook_never_holds_up_parking(start_worker, receiver, key):
    # Given a webhook that takes 20 s to answer (the client gives up after 2 s)
    receiver.statuses = [(200, {}, 20.0)] * 5
    start_worker(env=escalation_env(receiver, THRESHOLD_LETTERS=1, WEBHOOK_TIMEOUT_SECONDS=2))

    # When a first failure opens an incident, and more failures of other kinds follow
    first = t.declined.delay(key, 1)
    wait_for(lambda: receiver.received(), 15, message="the first webhook call")
    started = time.monotonic()
    later = [t.always_transient.delay(f"{key}-{n}") for n in range(3)]

    # Then they are parked at the pace of their own retries, not the webhook's
    wait_for(lambda: DeadLetter.objects.filter(task_id__in=[r.id for r in later]).count() == 3,
             20, message="3 more dead letters")
    assert time.monotonic() - started < 12
    assert DeadLetter.objects.filter(task_id=first.id).exists()
    # and the delivery that timed out is pending another attempt, with the reason
    note = wait_for(lambda: IncidentNotification.objects.exclude(last_error="").first(), 10,
                    message="a failed attempt")
    assert note.status == "pending"
    assert "timed out" in note.last_error


def test_a_critical_task_mails_the_admins_on_its_first_dead_letter(start_worker, receiver,
                                                                   smtp_server, key):
    port, mails = smtp_server.port, smtp_server.messages
    # Given a worker that mails ADMINS and treats `declined` as critical
    start_worker(env={
        **escalation_env(receiver, THRESHOLD_LETTERS=None,
                         CRITICAL_TASKS=["tests.integration.worker_tasks.declined"]),
        "RECOVERY_TEST_SMTP_PORT": str(port),
    })
    # When it fails for good once
    result = t.declined.delay(key, 77)
    # Then one mail and one ticket tell of it
    wait_for(lambda: mails, 20, message="the incident mail")
    wait_for(lambda: receiver.received(), 10, message="the ticket")
    incident = Incident.objects.get()
    assert incident.reason == Incident.Reason.CRITICAL_TASK
    assert incident.letters.get().task_id == result.id
    mail = mails[0]
    assert mail["To"] == "oncall@example.com"
    subject = " ".join(mail["Subject"].split())  # unfold the long header
    assert subject == (f"[Django] Incident #{incident.pk} opened: Critical task "
                       "tests.integration.worker_tasks.declined failed: DependencyError: card "
                       "declined for order 77")
    body = mail.get_payload(decode=True).decode()
    assert "card declined for order 77" in body
    assert f"https://ops.example.com/admin/recovery/incident/{incident.pk}/change/" in body
    time.sleep(1)
    assert len(mails) == 1
