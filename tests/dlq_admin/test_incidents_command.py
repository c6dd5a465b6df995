"""``manage.py incidents`` against the real test database."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from recovery.observe import escalation
from recovery.observe.escalation import Occurrence
from recovery.models import Incident, IncidentNotification

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command("incidents", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def incident(settings):
    settings.DEBUG = True  # a plain-HTTP webhook on localhost is allowed only with DEBUG
    settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": {
        "WEBHOOK_URL": "http://127.0.0.1:9/hook", "WEBHOOK_SECRET": "s" * 32}}
    return escalation.escalate(Occurrence(
        fingerprint="watchdog:task:tasks.slow", reason=Incident.Reason.STUCK_TASK,
        title="tasks.slow running past its deadline", task_name="tasks.slow",
        details={"task_ids": ["a1"], "exception": {"type": "", "message": ""}}))


def test_list_shows_open_incidents_and_hides_resolved_ones(incident):
    out = run()
    assert "tasks.slow running past its deadline" in out
    assert "open" in out
    escalation.resolve(incident, actor="x")
    assert run("list") == "No open incidents.\n"
    assert "tasks.slow running past its deadline" in run("list", "--all")


def test_list_as_json(incident):
    data = json.loads(run("list", "--json"))
    assert [row["id"] for row in data] == [incident.pk]
    assert data[0]["reason"] == "stuck_task"
    assert data[0]["url"] == f"/admin/recovery/incident/{incident.pk}/change/"


def test_show_has_the_diagnostics_and_the_notifications(incident):
    out = run("show", str(incident.pk))
    assert "title:           tasks.slow running past its deadline" in out
    assert "webhook  opened    pending" in out
    assert '"task_ids": [' in out


def test_ack_then_resolve_are_recorded_with_the_shell_user(incident):
    assert run("ack", str(incident.pk), "--note", "looking") == f"incident {incident.pk}: acknowledged\n"
    assert run("resolve", str(incident.pk)) == f"incident {incident.pk}: resolved\n"
    incident.refresh_from_db()
    assert incident.acknowledged_by.startswith("cli")
    assert incident.resolved_by.startswith("cli")
    assert incident.note == "looking"
    assert IncidentNotification.objects.filter(incident=incident, event="resolved").count() == 1


def test_an_unknown_incident_is_a_clear_error():
    with pytest.raises(CommandError, match="incident 999 does not exist"):
        run("resolve", "999")


def test_deliver_reports_what_it_sent(incident):
    # The configured webhook port refuses: nothing is sent, the row keeps the reason.
    assert run("deliver") == "0 notification(s) sent\n"
    note = IncidentNotification.objects.get()
    assert note.attempts == 1 and note.last_error.startswith("webhook unreachable")


def test_redeliver_puts_given_up_notifications_back_and_delivers(incident):
    IncidentNotification.objects.update(status="failed", attempts=12, last_error="HTTP 500")
    out = run("redeliver", str(incident.pk))
    assert out == "1 given-up notification(s) pending again\n0 notification(s) sent\n"
    note = IncidentNotification.objects.get()
    # the endpoint still refuses: pending again, one fresh attempt spent
    assert (note.status, note.attempts) == ("pending", 1)


def test_redeliver_of_an_unknown_incident_is_a_clear_error(incident):
    with pytest.raises(CommandError, match="incident 999 does not exist"):
        run("redeliver", "999")
