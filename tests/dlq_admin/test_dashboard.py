"""The on-call dashboard (/admin/recovery/dashboard/): the numbers behind it
(``dlq_admin.dashboard``), the server-drawn SVG charts and the page itself, on real
PostgreSQL with letters whose status, kind and last failure the tests choose. Shared state
(circuits) lives in the test database here, so every test starts with every circuit closed."""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from dlq_admin import dashboard, views
from recovery.workflows.circuit import Circuit
from recovery.models import DeadLetter, Incident, SagaRun

pytestmark = pytest.mark.django_db

#: a fixed "now" for the query functions: 14:25 UTC, so the current hour starts at 14:00
#: and the current 6-hour block at 12:00
NOW = datetime(2026, 3, 10, 14, 25, tzinfo=dt_timezone.utc)
UNREACHABLE = "redis://127.0.0.1:1/0"
_ids = itertools.count()


@pytest.fixture(autouse=True)
def database_state(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "database"}


def letter(last_failed_at: datetime, status: str = DeadLetter.Status.PARKED,
           kind: str = DeadLetter.Kind.DEPENDENCY, task_name: str = "tasks.a",
           fingerprint: str = "f" * 40, message: str = "boom") -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=f"t-{next(_ids)}", task_name=task_name, status=status, kind=kind,
        fingerprint=fingerprint, exception_type="DependencyError", exception_message=message,
        first_failed_at=last_failed_at - timedelta(minutes=1), last_failed_at=last_failed_at)


def incident(title: str, status=Incident.Status.OPEN, severity=Incident.Severity.ERROR,
             last_seen_at: datetime = NOW, fingerprint: str | None = None) -> Incident:
    return Incident.objects.create(
        fingerprint=fingerprint or title, reason=Incident.Reason.THRESHOLD, severity=severity,
        status=status, title=title, task_name="tasks.a", first_seen_at=last_seen_at,
        last_seen_at=last_seen_at)


def operator(client, *codenames: str):
    user = get_user_model().objects.create_user("oncall", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="recovery",
                                                         codename__in=codenames))
    client.force_login(user)
    return user


# -- the numbers -----------------------------------------------------------------------------


def test_status_counts_list_every_status_with_zeros():
    letter(NOW)
    letter(NOW)
    letter(NOW, status=DeadLetter.Status.RESOLVED)
    assert dashboard.status_counts() == {"parked": 2, "replaying": 0, "resolved": 1,
                                         "discarded": 0, "compensated": 0}


def test_kind_counts_are_of_the_last_day_and_week_with_those_still_parked():
    letter(NOW - timedelta(days=3), kind="data_integrity")  # parked, this week
    letter(NOW - timedelta(days=3), kind="data_integrity", status=DeadLetter.Status.RESOLVED)
    letter(NOW - timedelta(days=3), kind="data_integrity")
    letter(NOW - timedelta(hours=2), kind="timeout", status=DeadLetter.Status.RESOLVED)
    letter(NOW - timedelta(hours=1), kind="timeout")
    letter(NOW - timedelta(days=8), kind="timeout")  # parked, but before the week
    letter(NOW - timedelta(days=30), kind="poison")  # neither
    rows = [(k.kind, k.label, k.last_24h, k.last_7d, k.parked_7d)
            for k in dashboard.kind_counts(NOW)]
    assert rows == [("data_integrity", "Data integrity", 0, 3, 2),
                    ("timeout", "Timeout or deadlock", 2, 2, 1)]


def test_parked_buckets_per_hour_for_a_day_and_per_six_hours_for_a_week():
    letter(NOW - timedelta(minutes=5))  # 14:20, current hour (bucket 23), still parked
    letter(datetime(2026, 3, 10, 14, 0, tzinfo=dt_timezone.utc), status="resolved")  # bucket 23
    letter(datetime(2026, 3, 10, 13, 59, 59, tzinfo=dt_timezone.utc))  # bucket 22
    letter(datetime(2026, 3, 9, 15, 0, tzinfo=dt_timezone.utc), status="replaying")  # bucket 0
    letter(datetime(2026, 3, 9, 14, 59, tzinfo=dt_timezone.utc))  # before the day; in the week
    letter(datetime(2026, 3, 3, 18, 0, tzinfo=dt_timezone.utc))  # first 6-hour block
    letter(datetime(2026, 3, 3, 17, 59, tzinfo=dt_timezone.utc))  # before the week

    day, week = dashboard.parked_buckets(NOW)

    assert len(day) == 24 and len(week) == 28
    assert day[0].start == datetime(2026, 3, 9, 15, 0, tzinfo=dt_timezone.utc)
    assert day[-1].start == datetime(2026, 3, 10, 14, 0, tzinfo=dt_timezone.utc)
    assert all(b.end - b.start == timedelta(hours=1) for b in day)
    assert [(i, b.total, b.parked) for i, b in enumerate(day) if b.total] == [
        (0, 1, 0), (22, 1, 1), (23, 2, 1)]
    assert week[0].start == datetime(2026, 3, 3, 18, 0, tzinfo=dt_timezone.utc)
    assert week[-1].start == datetime(2026, 3, 10, 12, 0, tzinfo=dt_timezone.utc)
    assert all(b.end - b.start == timedelta(hours=6) for b in week)
    # 2026-03-09 14:59 and 15:00 are both in the block 12:00-18:00 of the 9th (index 23)
    assert [(i, b.total, b.parked) for i, b in enumerate(week) if b.total] == [
        (0, 1, 1), (23, 2, 1), (27, 3, 2)]


def test_parked_buckets_follow_the_current_time_zone(settings):
    settings.TIME_ZONE = "Asia/Kolkata"  # UTC+05:30: local hours start at :30 UTC
    letter(datetime(2026, 3, 10, 13, 45, tzinfo=dt_timezone.utc))  # 19:15 local
    day, week = dashboard.parked_buckets(NOW)  # 19:55 local
    assert day[-1].start == datetime(2026, 3, 10, 13, 30, tzinfo=dt_timezone.utc)
    assert day[-1].total == 1
    assert week[-1].start == datetime(2026, 3, 10, 12, 30, tzinfo=dt_timezone.utc)  # 18:00 local
    assert week[-1].total == 1


def test_hourly_buckets_stay_one_real_hour_across_a_daylight_saving_change(settings):
    settings.TIME_ZONE = "Europe/Berlin"  # 2026-03-29 02:00 CET -> 03:00 CEST
    now = datetime(2026, 3, 29, 3, 30, tzinfo=dt_timezone.utc)  # 05:30 CEST
    letter(datetime(2026, 3, 29, 0, 30, tzinfo=dt_timezone.utc))  # 01:30 CET
    letter(datetime(2026, 3, 29, 1, 30, tzinfo=dt_timezone.utc))  # 03:30 CEST
    day, _week = dashboard.parked_buckets(now)
    utc = dt_timezone.utc
    assert all(b.end.astimezone(utc) - b.start.astimezone(utc) == timedelta(hours=1) for b in day)
    assert day[-1].end.astimezone(utc) - day[0].start.astimezone(utc) == timedelta(hours=24)
    assert day[-1].start == datetime(2026, 3, 29, 3, 0, tzinfo=dt_timezone.utc)
    # each letter in the bucket of its own real hour, none lost or merged
    found = {b.start: b.total for b in day if b.total}
    assert found == {datetime(2026, 3, 29, 0, 0, tzinfo=dt_timezone.utc): 1,
                     datetime(2026, 3, 29, 1, 0, tzinfo=dt_timezone.utc): 1}


def test_top_tasks_and_fingerprints_of_the_last_day_most_letters_first():
    for _ in range(3):
        letter(NOW - timedelta(hours=1), task_name="tasks.charge", fingerprint="a" * 40,
               message="card declined for order 1")
    letter(NOW - timedelta(hours=2), task_name="tasks.charge", fingerprint="b" * 40,
           status="resolved", message="timeout")
    letter(NOW - timedelta(hours=3), task_name="tasks.ship", fingerprint="c" * 40)
    for _ in range(5):
        letter(NOW - timedelta(days=2), task_name="tasks.old", fingerprint="d" * 40)

    tasks = dashboard.top_tasks(NOW)
    assert [(t.task_name, t.total, t.parked) for t in tasks] == [
        ("tasks.charge", 4, 3), ("tasks.ship", 1, 1)]
    prints = dashboard.top_fingerprints(NOW, limit=2)
    assert [(f.fingerprint, f.task_name, f.total, f.parked) for f in prints] == [
        ("a" * 40, "tasks.charge", 3, 3), ("b" * 40, "tasks.charge", 1, 0)]
    assert prints[0].sample_message == "card declined for order 1"


def test_the_oldest_parked_letter_is_the_longest_waiting_parked_one():
    assert dashboard.oldest_parked(NOW) is None
    letter(NOW - timedelta(days=9), status=DeadLetter.Status.RESOLVED)
    oldest = letter(NOW - timedelta(days=2, hours=3))
    letter(NOW - timedelta(hours=1))
    found = dashboard.oldest_parked(NOW)
    assert found.pk == oldest.pk and found.age == timedelta(days=2, hours=3)


def test_open_incidents_unacknowledged_first_then_by_severity():
    warning = incident("w", severity=Incident.Severity.WARNING)
    critical_acked = incident("ca", severity=Incident.Severity.CRITICAL,
                              status=Incident.Status.ACKNOWLEDGED)
    error_old = incident("e-old", last_seen_at=NOW - timedelta(hours=1))
    error_new = incident("e-new")
    incident("r", status=Incident.Status.RESOLVED, severity=Incident.Severity.CRITICAL)

    summary = dashboard.open_incidents()

    assert summary.count == 4 and summary.unacknowledged == 3
    assert summary.highest_severity == "critical"
    assert summary.highest_unacknowledged == "error"
    assert summary.by_severity == {"warning": 1, "critical": 1, "error": 2}
    assert summary.top == [error_new, error_old, warning, critical_acked]
    assert dashboard.open_incidents(limit=1).top == [error_new]


def test_sagas_needing_a_human():
    run = SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                                 status=SagaRun.Status.NEEDS_HUMAN, error="refund failed")
    SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                           status=SagaRun.Status.HELD)
    summary = dashboard.sagas_needing_human()
    assert summary.count == 1 and summary.top == [run]


def test_circuit_states_from_the_shared_store():
    Circuit("partner-api").trip(seconds=120)
    (row,) = [r for r in dashboard.circuit_states() if r.name == "partner-api"]
    assert row.state == "open" and not row.error


def test_circuit_states_are_unknown_when_the_shared_store_is_down(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": UNREACHABLE,
                         "CIRCUITS": {"partner-api": {}, "other-api": {}}}
    rows = dashboard.circuit_states()
    assert [(r.name, r.state, r.label) for r in rows] == [
        ("other-api", "unknown", "unknown"), ("partner-api", "unknown", "unknown")]
    assert all("Error" in r.error for r in rows)


@pytest.mark.parametrize("parked, last_hour, expected", [
    (0, 0, "green"), (3, 0, "amber"), (40, 25, "amber"), (40, 26, "red")])
def test_the_parked_light_turns_red_at_the_growing_alerts_rate(parked, last_hour, expected):
    assert dashboard.parked_level(parked, last_hour).level == expected


def test_the_lights():
    summary = dashboard.IncidentSummary(0, 0, {}, None, None)
    assert dashboard.incident_level(summary).level == "green"
    acked = dashboard.IncidentSummary(1, 0, {"critical": 1}, "critical", None)
    assert dashboard.incident_level(acked).level == "amber"
    warning = dashboard.IncidentSummary(1, 1, {"warning": 1}, "warning", "warning")
    assert dashboard.incident_level(warning).level == "amber"
    error = dashboard.IncidentSummary(1, 1, {"error": 1}, "error", "error")
    assert dashboard.incident_level(error).level == "red"
    young = dashboard.OldestLetter(1, "t", "", "", NOW, timedelta(hours=23))
    old = dashboard.OldestLetter(1, "t", "", "", NOW, timedelta(hours=25))
    assert [dashboard.oldest_level(o).level for o in (None, young, old)] == [
        "green", "amber", "red"]
    assert dashboard.saga_level(dashboard.SagaSummary(0)).level == "green"
    assert dashboard.saga_level(dashboard.SagaSummary(2)).level == "red"


# -- the charts ------------------------------------------------------------------------------


def test_bar_chart_scales_to_a_round_maximum():
    start = NOW.replace(minute=0)
    buckets = [dashboard.Bucket(start + timedelta(hours=i), start + timedelta(hours=i + 1), t, p)
               for i, (t, p) in enumerate([(0, 0), (4, 1), (2, 2)])]
    chart = views.bar_chart(buckets, label=lambda b: "", title=lambda b: str(b.total),
                            url=lambda b: "/x", width=720, height=170)
    assert chart.axis_max == 5  # 4 rounded up to 1, 2, 5, 10, ...
    plot = 170 - 8 - 22
    def height(n: int) -> float:
        return round(n / 5 * plot, 1)

    assert [b.total_height for b in chart.bars] == [0.0, height(4), height(2)]
    assert [b.parked_height for b in chart.bars] == [0.0, height(1), height(2)]
    assert all(b.total_y + b.total_height == chart.baseline for b in chart.bars)
    assert [v for _, v in chart.ticks] == [0, 5]  # 2.5 is no count: no line halfway
    assert (chart.total, chart.parked) == (6, 3)


@pytest.mark.parametrize("value, nice", [(0, 1), (1, 1), (2, 2), (3, 5), (7, 10), (11, 20),
                                         (50, 50), (51, 100), (1234, 2000)])
def test_nice_ceiling(value, nice):
    assert views._nice_ceiling(value) == nice


@pytest.mark.parametrize("delta, shown", [
    (timedelta(seconds=40), "40 s"), (timedelta(minutes=12, seconds=5), "12 min"),
    (timedelta(hours=5), "5 h"), (timedelta(hours=5, minutes=12), "5 h 12 min"),
    (timedelta(days=3, hours=4, minutes=1), "3 d 4 h"), (timedelta(days=2), "2 d")])
def test_short_age(delta, shown):
    assert views.short_age(delta) == shown


# -- the page --------------------------------------------------------------------------------


def section(html: str, section_id: str) -> str:
    match = re.search(rf'<section class="module[^"]*" id="{section_id}">(.*?)</section>', html,
                      re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def rects(svg: str, cls: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'(\w+)="([^"]*)"', tag))
            for tag in re.findall(rf'<rect class="{cls}"[^>]*>', svg)]


@pytest.fixture
def fixed_now(monkeypatch):
    """The page's clock at 30 minutes past the hour, a day ago (so seeded letters are in
    the past and never straddle an hour as the test runs)."""
    from django.utils import timezone

    now = timezone.now().replace(minute=30, second=0, microsecond=0) - timedelta(days=1)
    monkeypatch.setattr(views, "clock", lambda: now)
    return now


def test_the_page_shows_counts_buckets_and_charts(client, fixed_now):
    now = fixed_now
    hour = now.replace(minute=0)
    for _ in range(3):
        letter(hour + timedelta(minutes=1), task_name="tasks.charge", fingerprint="a" * 40)
    letter(hour + timedelta(minutes=2), status=DeadLetter.Status.RESOLVED, task_name="tasks.charge",
           fingerprint="a" * 40)
    letter(hour - timedelta(hours=5) + timedelta(minutes=10), kind="timeout",
           task_name="tasks.ship", fingerprint="c" * 40)
    letter(now - timedelta(days=3), status=DeadLetter.Status.DISCARDED, task_name="tasks.old",
           fingerprint="d" * 40)
    oldest = letter(now - timedelta(days=12), task_name="tasks.ancient", fingerprint="e" * 40)
    open_incident = incident("Critical task tasks.charge failed", severity="critical")
    incident("old news", status=Incident.Status.RESOLVED)
    Circuit("partner-api").trip(seconds=600)
    operator(client, "view_deadletter", "view_incident")

    page = client.get(reverse("admin:recovery_dashboard"))

    assert page.status_code == 200
    html = page.content.decode()
    ctx = page.context
    assert ctx["parked"] == 5 and ctx["parked_last_hour"] == 4
    assert ctx["oldest"].pk == oldest.pk and ctx["oldest_short"] == "12 d"
    assert [i.pk for i in ctx["incidents"].top] == [open_incident.pk]
    assert {s["status"]: s["count"] for s in ctx["statuses"]} == {
        "parked": 5, "replaying": 0, "resolved": 1, "discarded": 1, "compensated": 0}
    assert [(t["row"].task_name, t["row"].total) for t in ctx["tasks"]] == [
        ("tasks.charge", 4), ("tasks.ship", 1)]
    # The status strip: its numbers and lights
    strip = re.search(r'<ul class="strip" id="status-strip">(.*?)</ul>', html, re.S).group(1)
    lights = dict(re.findall(r'id="light-(\w+)" data-level="(\w+)"', strip))
    assert lights == {"incidents": "red", "parked": "amber", "oldest": "red", "circuits": "red",
                      "sagas": "green"}
    values = dict(re.findall(r'id="light-(\w+)".*?<span class="value">([^<]*)</span>', strip, re.S))
    assert values == {"incidents": "1", "parked": "5", "oldest": "12 d", "circuits": "1",
                      "sagas": "0"}
    # The open incident is listed and linked; the resolved one is not
    incidents = section(html, "open-incidents")
    assert reverse("admin:recovery_incident_change", args=[open_incident.pk]) in incidents
    assert "old news" not in incidents
    # Hourly chart: 24 bars, the current hour (last) 4 letters of which 3 still parked, and
    # 5 hours before it 1; the axis tops out at 5
    day = section(html, "chart-day")
    totals, parked = rects(day, "bar-total"), rects(day, "bar-parked")
    assert len(totals) == len(parked) == 24
    plot = 180 - 8 - 22  # the chart's height less its top and bottom margins
    heights = [float(r["height"]) for r in totals]
    assert heights[-1] == round(4 / 5 * plot, 1) and heights[-6] == round(1 / 5 * plot, 1)
    assert sum(1 for h in heights if h) == 2
    assert float(parked[-1]["height"]) == round(3 / 5 * plot, 1)
    titles = re.findall(r"<title>([^<]*)</title>", day)
    assert len(titles) == 24
    assert titles[-1].endswith("4 letters parked, 3 still parked")
    assert titles[-6].endswith("1 letter parked, 1 still parked")
    assert titles[0].endswith("0 letters parked, 0 still parked")
    # Weekly chart: 28 bars; the letter of 3 days ago and the day's 5 are in it, the
    # 12-day-old one is not
    week = section(html, "chart-week")
    week_totals = rects(week, "bar-total")
    assert len(week_totals) == 28
    assert "6 parked in the last 7 days · 4 still parked" in week
    # Each bar links to the letters of its span
    assert re.search(r'href="/admin/recovery/deadletter/\?last_failed_at__gte=[^"]+&amp;'
                     r'last_failed_at__lt=', day)
    # Top fingerprints link to the failure group page
    assert reverse("admin:recovery_deadletter_group", args=["a" * 40]) in section(
        html, "top-fingerprints")
    # Circuits: the tripped one is open
    assert re.search(r'<code>partner-api</code></a></td>\s*<td><span class="state-open">open',
                     section(html, "circuits"))
    # Every status and kind links to the filtered change list
    assert 'href="/admin/recovery/deadletter/?status__exact=discarded"' in section(html,
                                                                                  "by-status")
    assert re.search(r'href="/admin/recovery/deadletter/\?kind__exact=timeout&amp;'
                     r'status__exact=parked&amp;last_failed_at__gte=[^"]+">1</a>',
                     section(html, "by-kind"))
    # Nothing from anywhere else: no scripts, styles or images from outside
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert '<meta http-equiv="refresh" content="60">' in html


def test_the_page_works_with_no_data_at_all(client):
    operator(client, "view_deadletter")
    page = client.get(reverse("admin:recovery_dashboard"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "No open incident." in html and "Nothing parked." in html
    assert len(rects(section(html, "chart-day"), "bar-total")) == 24
    lights = dict(re.findall(r'id="light-(\w+)" data-level="(\w+)"', html))
    assert lights == {"incidents": "green", "parked": "green", "oldest": "green",
                      "circuits": "green", "sagas": "green"}


def test_a_down_shared_store_shows_circuits_as_unknown(client, settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": UNREACHABLE}
    operator(client, "view_deadletter")
    page = client.get(reverse("admin:recovery_dashboard"))
    assert page.status_code == 200
    circuits = section(page.content.decode(), "circuits")
    assert '<span class="state-unknown">unknown</span>' in circuits
    assert "shared state unreachable" in circuits
    assert dict(re.findall(r'id="light-(\w+)" data-level="(\w+)"', page.content.decode())
                )["circuits"] == "amber"


def test_links_need_the_permission_of_their_page(client):
    incident("only the title")
    SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                           status=SagaRun.Status.NEEDS_HUMAN)
    operator(client, "view_deadletter")
    html = client.get(reverse("admin:recovery_dashboard")).content.decode()
    assert "only the title" in html
    assert "/admin/recovery/incident/" not in section(html, "open-incidents")
    assert "/admin/recovery/sagarun/" not in section(html, "sagas-needing-human")


def test_refresh_can_be_turned_off(client):
    operator(client, "view_deadletter")
    html = client.get(reverse("admin:recovery_dashboard"), {"refresh": "0"}).content.decode()
    assert 'http-equiv="refresh"' not in html


def test_without_view_deadletter_the_page_is_forbidden(client):
    operator(client, "view_incident", "view_sagarun")
    assert client.get(reverse("admin:recovery_dashboard")).status_code == 403


def test_change_deadletter_implies_viewing_the_page(client):
    operator(client, "change_deadletter")
    assert client.get(reverse("admin:recovery_dashboard")).status_code == 200


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    page = client.get(reverse("admin:recovery_dashboard"))
    assert page.status_code == 302 and page["Location"].startswith(reverse("admin:login"))


def test_the_admin_index_and_the_letter_list_link_to_the_dashboard(client):
    url = reverse("admin:recovery_dashboard")
    assert url == "/admin/recovery/dashboard/"
    operator(client, "view_deadletter")
    assert f'href="{url}"' in client.get(reverse("admin:index")).content.decode()
    assert f'href="{url}"' in client.get(
        reverse("admin:recovery_deadletter_changelist")).content.decode()


def test_the_index_has_no_dashboard_link_for_those_who_may_not_see_it(client):
    operator(client, "view_sagarun")
    html = client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:recovery_dashboard") not in html
