"""The on-call dashboard in a real headless Chromium, over HTTP: with letters across the
last week, an open incident, an open circuit (in the test Redis, as every worker would
see it) and a saga run that needs a human, the on-call logs in, reads the status strip
and the charts, opens the incident from the dashboard and acknowledges it."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import expect

from recovery.workflows.circuit import Circuit
from recovery.models import DeadLetter, Incident, SagaRun

from .conftest import log_in, make_staff

pytestmark = pytest.mark.browser

SCREENSHOT = "/tmp/dashboard.png"
ON_CALL_PERMS = ("view_deadletter", "view_incident", "acknowledge_incident", "view_sagarun",
                 "view_sharedstate")
_ids = itertools.count()


def letter(last_failed_at, status=DeadLetter.Status.PARKED, task_name="tasks.orders.charge_payment",
           kind=DeadLetter.Kind.DEPENDENCY, message="card declined") -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=f"browser-{next(_ids)}", task_name=task_name, status=status, kind=kind,
        fingerprint=f"{abs(hash((task_name, message))):040d}"[:40],
        exception_type="recovery.errors.DependencyError", exception_message=message,
        first_failed_at=last_failed_at, last_failed_at=last_failed_at)


def seed_week(now) -> dict:
    """Letters over the last 24 hours (1 to 4 an hour, every third one handled since) and
    the days before; returns what the strip should say."""
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    parked = 0
    for hours_ago in range(24):
        # a minute past each hour: never straddles an hour boundary as the test runs
        at = this_hour - timedelta(hours=hours_ago) + timedelta(seconds=1)
        for n in range(hours_ago % 4 + 1):
            handled = n == 2
            letter(at, status=DeadLetter.Status.RESOLVED if handled else DeadLetter.Status.PARKED,
                   task_name="tasks.imports.load_row" if n % 2 else "tasks.orders.charge_payment",
                   kind=DeadLetter.Kind.DATA_INTEGRITY if n % 2 else DeadLetter.Kind.DEPENDENCY,
                   message="row 7: bad date" if n % 2 else "card declined")
            parked += not handled
    for days_ago in range(2, 7):
        for _ in range(days_ago):
            letter(now - timedelta(days=days_ago), status=DeadLetter.Status.DISCARDED,
                   task_name="tasks.reports.build", kind=DeadLetter.Kind.TIMEOUT,
                   message="statement timeout")
    oldest = letter(now - timedelta(days=6, hours=2, minutes=30), task_name="tasks.reports.build",
                    kind=DeadLetter.Kind.TIMEOUT, message="statement timeout")
    return {"parked": parked + 1, "oldest": oldest}


@pytest.fixture
def open_circuit(broker):
    """``partner-api`` tripped open for ten minutes in the test Redis (the shared store the
    workers read), as ``manage.py circuits trip partner-api --seconds 600`` does."""
    Circuit("partner-api").trip(seconds=600)
    yield "partner-api"


def test_the_on_call_reads_the_dashboard_and_acknowledges_the_incident(page, live_server,
                                                                       open_circuit):
    # Given a week of dead letters, an open critical incident, an open circuit and a saga
    # run whose compensation failed
    now = timezone.now()
    seeded = seed_week(now)
    incident = Incident.objects.create(
        fingerprint="f" * 40, reason=Incident.Reason.CRITICAL_TASK,
        severity=Incident.Severity.CRITICAL,
        title="Critical task tasks.orders.charge_payment failed: card declined",
        task_name="tasks.orders.charge_payment", kind="dependency", count=3,
        details={"exception": {"type": "recovery.errors.DependencyError",
                               "message": "card declined"},
                 "traceback": "Traceback (most recent call last):\n...", "args": [42, "••••••"]},
        first_seen_at=now - timedelta(minutes=40), last_seen_at=now - timedelta(minutes=2))
    incident.letters.add(*DeadLetter.objects.filter(task_name="tasks.orders.charge_payment")[:3])
    SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                           status=SagaRun.Status.NEEDS_HUMAN,
                           error="compensation tasks.orders.refund_payment failed for good")
    make_staff("on-call", *ON_CALL_PERMS)

    # When the on-call logs in and opens the dashboard
    page.set_viewport_size({"width": 1440, "height": 1000})
    log_in(page, "on-call", next_path=reverse("admin:recovery_dashboard"))
    expect(page).to_have_url(re.compile(r"/admin/recovery/dashboard/$"))

    # Then the status strip says what is wrong, in red, amber and green
    strip = page.locator("#status-strip")
    expect(strip.locator("#light-incidents .value")).to_have_text("1")
    expect(strip.locator("#light-incidents .detail")).to_contain_text("critical")
    expect(strip.locator("#light-incidents")).to_have_attribute("data-level", "red")
    expect(strip.locator("#light-parked .value")).to_have_text(str(seeded["parked"]))
    expect(strip.locator("#light-parked")).to_have_attribute("data-level", "amber")
    expect(strip.locator("#light-oldest .value")).to_have_text("6 d 2 h")
    expect(strip.locator("#light-oldest")).to_have_attribute("data-level", "red")
    expect(strip.locator("#light-circuits .value")).to_have_text("1")
    expect(strip.locator("#light-circuits")).to_have_attribute("data-level", "red")
    expect(strip.locator("#light-sagas .value")).to_have_text("1")
    expect(strip.locator("#light-sagas")).to_have_attribute("data-level", "red")
    # ... the charts were drawn, with visible bars
    for chart, bars in (("#chart-day", 24), ("#chart-week", 28)):
        svg = page.locator(f"{chart} svg")
        expect(svg).to_be_visible()
        expect(svg.locator("rect.bar-total")).to_have_count(bars)
        tallest = max(svg.locator("rect.bar-total").evaluate_all(
            "rects => rects.map(r => r.getBoundingClientRect().height)"))
        assert tallest > 20, f"{chart}: the tallest bar is {tallest}px high"
    expect(page.locator("#chart-day svg rect.bar-parked").first).to_be_visible()
    # ... the circuit is open and the saga is listed
    expect(page.locator("#circuits tr.circuit-open")).to_contain_text("partner-api")
    expect(page.locator("#sagas-needing-human")).to_contain_text("order #")
    expect(page.locator("#oldest-parked")).to_contain_text(f"#{seeded['oldest'].pk}")
    page.screenshot(path=SCREENSHOT, full_page=True)

    # When they open the incident from the dashboard
    link = page.locator("#open-incidents a", has_text="Critical task tasks.orders.charge_payment")
    expect(link).to_have_count(1)
    with page.expect_navigation():
        link.click()

    # Then its page shows it open, with its diagnostics, and they acknowledge it
    expect(page).to_have_url(re.compile(rf"/admin/recovery/incident/{incident.pk}/change/$"))
    expect(page.locator(".field-status .readonly")).to_have_text("Open")
    expect(page.locator(".field-traceback_pre pre")).to_contain_text("Traceback")
    page.fill("#id_incident_note", "payments provider paged")
    with page.expect_navigation():
        page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator("ul.messagelist li")).to_have_text("1 incident was acknowledged.")
    expect(page.locator(".field-status .readonly")).to_have_text("Acknowledged")
    expect(page.locator(".field-acknowledged_by .readonly")).to_have_text("on-call")
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
    incident.refresh_from_db()
    assert incident.status == Incident.Status.ACKNOWLEDGED
    assert incident.note == "payments provider paged"

    # And back on the dashboard the incident light is amber: someone is on it
    page.goto(reverse("admin:recovery_dashboard"))
    expect(page.locator("#light-incidents")).to_have_attribute("data-level", "amber")

    # Nothing was fetched from anywhere but the live server
    assert page.requests, "the page made no requests at all"
    assert page.requests.external(live_server) == [], "the dashboard loaded external resources"
