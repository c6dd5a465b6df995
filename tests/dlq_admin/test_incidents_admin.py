"""The incident admin: the list (open first), the read-only incident page with its
diagnostics, letters, saga run and notifications, and acknowledge / resolve by action and
by button, each behind its permission. Real PostgreSQL; the status changes go through
recovery.observe.escalation, so resolving queues the webhook's "resolved" notification."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from recovery.models import DeadLetter, Incident, IncidentNotification, SagaRun
from recovery.core.redaction import MASK

pytestmark = pytest.mark.django_db

_ids = itertools.count()
FP = "ab12" * 10
DETAILS = {
    "task": "tasks.orders.charge_payment",
    "args": [42, MASK],
    "kwargs": {"card_token": MASK, "amount": 12},
    "exception": {"type": "recovery.errors.DependencyError", "message": "card declined"},
    "traceback": "Traceback (most recent call last):\n  File \"charge.py\", line 3\n"
                 "DependencyError: card declined <script>",
    "history": [{"attempt": 1, "at": "2026-03-10T14:00:00+00:00", "kind": "dependency",
                 "exception_type": "DependencyError", "exception_message": "card declined",
                 "delay_seconds": 2.5}],
    "classification": {"kind": "dependency", "permanent": True, "reason": "gave up"},
    "links": {"letter": "/admin/recovery/deadletter/1/change/", "evil": "javascript:alert(1)"},
    "worker": "celery@host-1",
}


def make_incident(title="Critical task tasks.orders.charge_payment failed: card declined",
                  status=Incident.Status.OPEN, severity=Incident.Severity.CRITICAL,
                  last_seen_at=None, fingerprint=None, **fields) -> Incident:
    now = timezone.now()
    return Incident.objects.create(
        fingerprint=fingerprint or f"fp-{next(_ids)}", reason=Incident.Reason.CRITICAL_TASK,
        severity=severity, status=status, title=title, task_name="tasks.orders.charge_payment",
        kind="dependency", queue="celery", first_seen_at=now - timedelta(hours=1),
        last_seen_at=last_seen_at or now, **fields)


def letter(fingerprint: str = FP) -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=f"task-{next(_ids)}", task_name="tasks.orders.charge_payment",
        fingerprint=fingerprint, exception_type="DependencyError",
        exception_message="card declined")


def operator(client, *codenames: str, superuser: bool = False):
    user = get_user_model().objects.create_user(f"op{next(_ids)}", password="pw", is_staff=True,
                                                is_superuser=superuser)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="recovery",
                                                         codename__in=codenames))
    client.force_login(user)
    return user


def notify(incident: Incident, channel: str, event: str = IncidentNotification.Event.OPENED,
           **fields) -> IncidentNotification:
    return IncidentNotification.objects.create(incident=incident, channel=channel, event=event,
                                               **fields)


def messages_of(response) -> list[str]:
    """The messages a response set (read once: later requests do not see them again)."""
    return [str(m) for m in get_messages(response.wsgi_request)]


def shown_after(client, url: str, data=None) -> list[str]:
    """POST, follow the redirect, and return the messages the next page showed."""
    response = client.post(url, data or {}, follow=True)
    assert response.redirect_chain, "no redirect"
    return [str(m) for m in response.context["messages"]]


# -- the list --------------------------------------------------------------------------------


def test_the_list_shows_open_incidents_first_the_most_recently_seen_on_top(client):
    now = timezone.now()
    resolved = make_incident("resolved", status=Incident.Status.RESOLVED, last_seen_at=now)
    acked = make_incident("acked", status=Incident.Status.ACKNOWLEDGED, last_seen_at=now)
    old_open = make_incident("old open", last_seen_at=now - timedelta(hours=3))
    new_open = make_incident("new open", last_seen_at=now - timedelta(minutes=1))
    operator(client, "view_incident")
    page = client.get(reverse("admin:recovery_incident_changelist"))
    assert page.status_code == 200
    assert list(page.context["cl"].result_list) == [new_open, old_open, acked, resolved]
    html = page.content.decode()
    for column in ("column-status", "column-severity", "column-reason", "column-title",
                   "column-task_name", "column-count", "column-first_seen_at",
                   "column-last_seen_at"):
        assert column in html


def test_the_list_filters_by_status_severity_and_reason_and_searches(client):
    make_incident("payments down", fingerprint="deadbeef" * 5)
    make_incident("warning", severity=Incident.Severity.WARNING, status=Incident.Status.RESOLVED)
    operator(client, "view_incident")
    url = reverse("admin:recovery_incident_changelist")

    def titles(**params):
        return [i.title for i in client.get(url, params).context["cl"].result_list]

    assert titles(status__exact="resolved") == ["warning"]
    assert titles(severity__exact="critical") == ["payments down"]
    assert titles(reason__exact="critical_task") == ["payments down", "warning"]  # open first
    assert titles(reason__exact="threshold") == []
    assert titles(q="deadbeefdead") == ["payments down"]  # a fingerprint prefix
    assert titles(q="payments") == ["payments down"]
    # the dashboard's link: every incident not resolved
    assert titles(status__in="open,acknowledged") == ["payments down"]


# -- the incident page -----------------------------------------------------------------------


def test_the_page_shows_diagnostics_letters_saga_run_and_notifications(client):
    run = SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                                 status=SagaRun.Status.NEEDS_HUMAN)
    incident = make_incident(details=DETAILS, saga_run=run, fingerprint=FP)
    first, second = letter(), letter()
    incident.letters.add(first, second)
    notify(incident, "webhook", status=IncidentNotification.Status.FAILED, attempts=5,
           last_error="HTTP 500 from the bridge")
    notify(incident, "email", status=IncidentNotification.Status.SENT, attempts=1,
           sent_at=timezone.now())
    operator(client, "view_incident")

    page = client.get(reverse("admin:recovery_incident_change", args=[incident.pk]))

    assert page.status_code == 200
    html = page.content.decode()
    assert "<strong>recovery.errors.DependencyError</strong>: card declined" in html
    assert "dependency (permanent): gave up" in html
    # the traceback in <pre>, escaped
    assert "<pre>Traceback (most recent call last):" in html
    assert "card declined &lt;script&gt;" in html and "declined <script>" not in html
    # the arguments as stored: masked
    assert f"&quot;card_token&quot;: &quot;{MASK}&quot;" in html
    assert "&quot;amount&quot;: 12" in html
    assert "<td>2.5</td>" in html  # the history table
    assert 'href="/admin/recovery/deadletter/1/change/">letter</a>' in html
    assert "javascript:alert" not in html
    assert "celery@host-1" in html  # the other details
    # its letters, each linked, and all letters of the fingerprint
    for one in (first, second):
        assert f'href="{reverse("admin:recovery_deadletter_change", args=[one.pk])}"' in html
    assert f'href="{reverse("admin:recovery_deadletter_changelist")}?fingerprint={FP}"' in html
    assert f'href="{reverse("admin:recovery_deadletter_group", args=[FP])}"' in html
    assert "2 letters linked" in html
    # its saga run
    run_url = reverse("admin:recovery_sagarun_change", args=[run.pk])
    assert f'href="{run_url}">order #{run.pk}' in html
    # its notifications
    assert "HTTP 500 from the bridge" in html
    assert "E-mail to ADMINS" in html and "Gave up" in html
    # read-only: no save button, no field to edit
    assert 'name="_save"' not in html and 'name="title"' not in html


def test_a_watchdog_incident_without_letters_or_diagnostics_still_shows(client):
    incident = make_incident(details={"stuck": ["t-1"]}, fingerprint="watchdog:task:tasks.x")
    operator(client, "view_incident")
    html = client.get(reverse("admin:recovery_incident_change", args=[incident.pk])
                      ).content.decode()
    assert "None linked." in html and "&quot;stuck&quot;" in html


def test_no_add_no_edit_and_delete_only_for_superusers(client):
    incident = make_incident()
    operator(client, "view_incident", "add_incident", "change_incident", "delete_incident")
    assert client.get(reverse("admin:recovery_incident_add")).status_code == 403
    change = reverse("admin:recovery_incident_change", args=[incident.pk])
    assert client.post(change, {"title": "renamed", "status": "resolved"}).status_code == 403
    assert client.get(reverse("admin:recovery_incident_delete", args=[incident.pk])
                      ).status_code == 403
    incident.refresh_from_db()
    assert incident.title.startswith("Critical task") and incident.status == "open"
    client.logout()
    operator(client, superuser=True)
    assert client.get(reverse("admin:recovery_incident_delete", args=[incident.pk])
                      ).status_code == 200


# -- acknowledge and resolve: buttons --------------------------------------------------------


def test_buttons_show_by_permission_and_status(client):
    incident = make_incident()
    url = reverse("admin:recovery_incident_change", args=[incident.pk])
    operator(client, "view_incident")
    html = client.get(url).content.decode()
    assert ">Acknowledge</button>" not in html and ">Resolve</button>" not in html
    client.logout()
    operator(client, "view_incident", "acknowledge_incident", "resolve_incident")
    html = client.get(url).content.decode()
    assert ">Acknowledge</button>" in html and ">Resolve</button>" in html
    Incident.objects.filter(pk=incident.pk).update(status=Incident.Status.ACKNOWLEDGED)
    html = client.get(url).content.decode()
    assert ">Acknowledge</button>" not in html and ">Resolve</button>" in html
    Incident.objects.filter(pk=incident.pk).update(status=Incident.Status.RESOLVED)
    html = client.get(url).content.decode()
    assert ">Acknowledge</button>" not in html and ">Resolve</button>" not in html


def test_the_acknowledge_button_acknowledges_with_the_actor_and_note(client):
    incident = make_incident()
    user = operator(client, "view_incident", "acknowledge_incident")
    response = client.post(reverse("admin:recovery_incident_acknowledge", args=[incident.pk]),
                           {"note": "looking at the payment provider"})
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:recovery_incident_change", args=[incident.pk])
    incident.refresh_from_db()
    assert incident.status == "acknowledged" and incident.acknowledged_by == user.username
    assert incident.acknowledged_at is not None
    assert incident.note == "looking at the payment provider"
    assert messages_of(response) == ["1 incident was acknowledged."]


def test_without_permission_the_operation_urls_are_forbidden_and_change_nothing(client):
    incident = make_incident()
    operator(client, "view_incident")
    for operation in ("acknowledge", "resolve"):
        url = reverse(f"admin:recovery_incident_{operation}", args=[incident.pk])
        assert client.get(url).status_code == 403
        assert client.post(url, {"note": "x"}).status_code == 403
    client.logout()
    operator(client, "view_incident", "acknowledge_incident")  # may acknowledge, not resolve
    assert client.post(reverse("admin:recovery_incident_resolve", args=[incident.pk])
                       ).status_code == 403
    incident.refresh_from_db()
    assert incident.status == "open" and not incident.note
    assert not IncidentNotification.objects.exists()


def test_the_operation_urls_need_the_view_permission_too(client):
    incident = make_incident()
    operator(client, "acknowledge_incident")
    assert client.post(reverse("admin:recovery_incident_acknowledge", args=[incident.pk])
                       ).status_code == 403
    incident.refresh_from_db()
    assert incident.status == "open"


def test_get_on_an_operation_url_asks_for_confirmation(client):
    incident = make_incident()
    operator(client, "view_incident", "resolve_incident")
    page = client.get(reverse("admin:recovery_incident_resolve", args=[incident.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "You are about to resolve 1 incident." in html and 'value="Yes, resolve"' in html
    incident.refresh_from_db()
    assert incident.status == "open"


def test_resolve_queues_a_resolved_webhook_only_when_the_opening_was_sent_to_a_webhook(client):
    told = make_incident("told the webhook")
    notify(told, "webhook", status=IncidentNotification.Status.SENT)
    notify(told, "email", status=IncidentNotification.Status.SENT)
    untold = make_incident("only e-mailed")
    notify(untold, "email", status=IncidentNotification.Status.SENT)
    user = operator(client, "view_incident", "resolve_incident")

    for incident in (told, untold):
        assert shown_after(client, reverse("admin:recovery_incident_resolve", args=[incident.pk]),
                           {"note": "provider fixed it"}) == ["1 incident was resolved."]
        incident.refresh_from_db()
        assert incident.status == "resolved" and incident.resolved_by == user.username
        assert incident.note == "provider fixed it"

    resolved = IncidentNotification.objects.filter(event=IncidentNotification.Event.RESOLVED)
    assert list(resolved.values_list("incident_id", "channel", "status")) == [
        (told.pk, "webhook", "pending")]


def test_resolving_a_resolved_incident_again_changes_and_queues_nothing(client):
    incident = make_incident()
    notify(incident, "webhook", status=IncidentNotification.Status.SENT)
    operator(client, "view_incident", "resolve_incident")
    url = reverse("admin:recovery_incident_resolve", args=[incident.pk])
    assert shown_after(client, url) == ["1 incident was resolved."]
    assert shown_after(client, url) == ["0 incidents were resolved."]
    assert IncidentNotification.objects.filter(event="resolved").count() == 1


# -- acknowledge and resolve: bulk actions ---------------------------------------------------


def action(client, name: str, incidents, **extra):
    return client.post(reverse("admin:recovery_incident_changelist"), {
        "action": name, helpers.ACTION_CHECKBOX_NAME: [i.pk for i in incidents], **extra})


def test_bulk_acknowledge_confirms_first_then_acknowledges_the_open_ones(client):
    first, second = make_incident("one"), make_incident("two")
    done = make_incident("three", status=Incident.Status.RESOLVED)
    user = operator(client, "view_incident", "acknowledge_incident")

    confirm = action(client, "acknowledge_selected", [first, second, done])

    assert confirm.status_code == 200
    html = confirm.content.decode()
    assert "You are about to acknowledge 2 incidents." in html
    assert "1 selected incident that is not open will be left alone." in html
    assert Incident.objects.filter(status="open").count() == 2  # nothing yet

    response = action(client, "acknowledge_selected", [first, second, done], post="yes",
                      note="on it")

    assert response.status_code == 302
    assert messages_of(response) == ["2 incidents were acknowledged."]
    assert sorted(Incident.objects.values_list("title", "status", "acknowledged_by", "note")) == [
        ("one", "acknowledged", user.username, "on it"),
        ("three", "resolved", "", ""),
        ("two", "acknowledged", user.username, "on it")]


def test_bulk_resolve_resolves_open_and_acknowledged_and_notifies_the_webhook(client):
    opened = make_incident("one")
    notify(opened, "webhook", status=IncidentNotification.Status.SENT)
    acked = make_incident("two", status=Incident.Status.ACKNOWLEDGED)
    operator(client, "view_incident", "resolve_incident")

    response = action(client, "resolve_selected", [opened, acked], post="yes")

    assert messages_of(response) == ["2 incidents were resolved."]
    assert set(Incident.objects.values_list("status", flat=True)) == {"resolved"}
    assert list(IncidentNotification.objects.filter(event="resolved")
                .values_list("incident_id", "channel")) == [(opened.pk, "webhook")]


def test_actions_are_offered_only_with_their_permission_and_otherwise_change_nothing(client):
    incident = make_incident()
    operator(client, "view_incident")
    page = client.get(reverse("admin:recovery_incident_changelist"))
    assert "acknowledge_selected" not in page.content.decode()
    assert "resolve_selected" not in page.content.decode()
    for name in ("acknowledge_selected", "resolve_selected"):
        response = action(client, name, [incident], post="yes")
        assert response.status_code in (200, 302)
    incident.refresh_from_db()
    assert incident.status == "open"
    client.logout()
    operator(client, "view_incident", "acknowledge_incident")
    html = client.get(reverse("admin:recovery_incident_changelist")).content.decode()
    assert "acknowledge_selected" in html and "resolve_selected" not in html
    assert "delete_selected" not in html


def test_a_bulk_action_over_its_limit_says_so_and_acts_on_the_first_ones(client, monkeypatch):
    from dlq_admin import incidents_admin

    monkeypatch.setattr(incidents_admin, "BULK_MAX", 2)
    incidents = [make_incident(f"incident {n}", fingerprint=f"fp-{n}") for n in range(3)]
    operator(client, "view_incident", "acknowledge_incident")

    confirm = action(client, "acknowledge_selected", incidents)
    assert ("3 incidents are selected; one action acts on at most 2: the first 2 by id"
            in confirm.content.decode())

    action(client, "acknowledge_selected", incidents, post="yes")
    assert sorted(Incident.objects.values_list("title", "status")) == [
        ("incident 0", "acknowledged"), ("incident 1", "acknowledged"), ("incident 2", "open")]
