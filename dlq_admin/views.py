"""The on-call dashboard: ``/admin/recovery/dashboard/``, for whoever may see dead letters
(``recovery.view_deadletter``).

Built for the first five seconds of an incident: a status strip of red, amber and green
lights (open incidents, letters parked now, the oldest parked letter, open circuits, saga
runs that need a human), then the open incidents, the letters parked per hour (last day)
and per 6 hours (last week) as bar charts, the top failing tasks and fingerprints of the
last day, dead letters by status and kind, circuit states and sagas. Every number links
to the filtered list behind it.

The charts are inline SVG drawn here, on the server: the page loads nothing but static
files (the admin's and ``dlq_admin/dashboard.css``: the Content-Security-Policy allows no
inline style), and works offline. The numbers come from :mod:`.dashboard`.

:func:`install` adds the page to an ``AdminSite`` (``DlqAdminConfig.ready`` installs it on
the default site) and links it from the admin index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from urllib.parse import urlencode

from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.timesince import timesince

from recovery.models import DeadLetter

from . import dashboard as data
from .rehearsals_admin import running_rehearsals

__all__ = ["Bar", "Chart", "bar_chart", "short_age", "dashboard_view", "install", "PERMISSION"]

PERMISSION = "recovery.view_deadletter"
#: seconds between automatic reloads of the page (``?refresh=0`` turns it off)
REFRESH_SECONDS = 60


# -- bar charts as SVG geometry ---------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    total: int
    parked: int
    total_y: float
    total_height: float
    parked_y: float
    parked_height: float
    title: str
    label: str  # the x-axis label under this bar, or ""
    label_x: float
    label_anchor: str  # start | middle | end: kept inside the chart at either end
    url: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: float
    top: int
    baseline: float
    axis_max: int
    ticks: list[tuple[float, int]]  # (y, value) of the horizontal grid lines
    bars: list[Bar]
    total: int
    parked: int


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... at or above ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def bar_chart(buckets: list[data.Bucket], label, title, url, width: int = 640,
              height: int = 180) -> Chart:
    """Geometry of a bar chart of ``buckets`` (one bar each: all letters, with the part
    still parked drawn over it from the baseline). ``label(bucket)``, ``title(bucket)``
    and ``url(bucket)`` give each bar's axis label, tooltip and link."""
    left, right_margin, top, bottom = 40, 6, 8, 22
    plot_width = width - left - right_margin
    plot_height = height - top - bottom
    baseline = top + plot_height
    axis_max = _nice_ceiling(max((b.total for b in buckets), default=0))
    slot = plot_width / max(len(buckets), 1)
    bar_width = round(slot * 0.78, 2)

    def scaled(n: int) -> float:
        return round(n / axis_max * plot_height, 1)

    bars = []
    for i, bucket in enumerate(buckets):
        x = round(left + i * slot + (slot - bar_width) / 2, 2)
        total_height, parked_height = scaled(bucket.total), scaled(bucket.parked)
        anchor, label_x = "middle", round(x + bar_width / 2, 2)
        if i < 2:
            anchor, label_x = "start", x
        elif i >= len(buckets) - 2:
            anchor, label_x = "end", round(x + bar_width, 2)
        bars.append(Bar(x, bar_width, bucket.total, bucket.parked,
                        round(baseline - total_height, 1), total_height,
                        round(baseline - parked_height, 1), parked_height,
                        title(bucket), label(bucket), label_x, anchor, url(bucket)))
    # grid lines at 0, the top and (when it is a whole number) halfway
    values = [0, axis_max // 2, axis_max] if axis_max % 2 == 0 else [0, axis_max]
    ticks = [(round(baseline - scaled(v), 1), v) for v in values]
    return Chart(width, height, left, width - right_margin, top, baseline, axis_max, ticks, bars,
                 sum(b.total for b in buckets), sum(b.parked for b in buckets))


# -- the page ---------------------------------------------------------------------------------


def clock() -> datetime:
    """The page's "now" (one module function, so tests can choose it)."""
    return timezone.now()


def _changelist(**filters) -> str:
    url = reverse("admin:recovery_deadletter_changelist")
    return f"{url}?{urlencode(filters)}" if filters else url


def _span(bucket: data.Bucket) -> dict[str, str]:
    return {"last_failed_at__gte": bucket.start.isoformat(),
            "last_failed_at__lt": bucket.end.isoformat()}


def _bucket_title(bucket: data.Bucket, fmt: str) -> str:
    start, end = timezone.localtime(bucket.start), timezone.localtime(bucket.end)
    return (f"{start:{fmt}}–{end:%H:%M}: {bucket.total} letter{'s' if bucket.total != 1 else ''}"
            f" parked, {bucket.parked} still parked")


def _charts(now: datetime) -> tuple[Chart, Chart]:
    last_day, last_week = data.parked_buckets(now)
    url = lambda b: _changelist(**_span(b))  # noqa: E731
    hourly = bar_chart(
        last_day,
        label=lambda b: f"{timezone.localtime(b.start):%H:%M}"
        if timezone.localtime(b.start).hour % 3 == 0 else "",
        title=lambda b: _bucket_title(b, "%a %d %b %H:%M"), url=url)
    weekly = bar_chart(
        last_week,
        label=lambda b: f"{timezone.localtime(b.start):%a %d}"
        if timezone.localtime(b.start).hour == 0 else "",
        title=lambda b: _bucket_title(b, "%a %d %b %H:%M"), url=url)
    return hourly, weekly


def _age(delta: timedelta) -> str:
    now = timezone.now()
    return timesince(now - delta, now)


def short_age(delta: timedelta) -> str:
    """``delta`` in at most two units, to read at a glance: 3 d 4 h, 5 h 12 min, 40 s."""
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"


def dashboard_view(request: HttpRequest, site: AdminSite) -> TemplateResponse:
    user = request.user
    # change_deadletter implies viewing, as everywhere in the admin.
    if not (user.has_perm(PERMISSION) or user.has_perm("recovery.change_deadletter")):
        raise PermissionDenied
    now = clock()
    statuses = data.status_counts()
    parked = statuses[DeadLetter.Status.PARKED]
    last_hour = data.parked_since(now - timedelta(hours=1))
    oldest = data.oldest_parked(now)
    incidents = data.open_incidents()
    circuits = data.circuit_states()
    sagas = data.sagas_needing_human()
    lights = data.levels(incidents, parked, last_hour, oldest, circuits, sagas)
    hourly, weekly = _charts(now)
    day_ago = (now - timedelta(hours=24)).isoformat(timespec="seconds")
    week_ago = (now - timedelta(days=7)).isoformat(timespec="seconds")
    labels = dict(DeadLetter.Status.choices)
    circuit_counts = {state: sum(1 for row in circuits if row.state == state)
                      for state in ("open", "half_open", "unknown")}
    context = {
        **site.each_context(request),
        "title": "On-call dashboard",
        "now": now,
        # Failures caused on purpose: whoever looks must know before reading a number.
        "rehearsals": [{"rehearsal": r, "until": r.expires_at,
                        "url": reverse("admin:recovery_rehearsal_change", args=[r.pk],
                                       current_app=site.name)}
                       for r in running_rehearsals()],
        "refresh": 0 if request.GET.get("refresh") == "0" else REFRESH_SECONDS,
        "lights": lights,
        "incidents": incidents,
        "parked": parked,
        "parked_last_hour": last_hour,
        "oldest": oldest,
        "oldest_age": _age(oldest.age) if oldest else "",
        "oldest_short": short_age(oldest.age) if oldest else "",
        "circuits": circuits,
        "circuit_counts": circuit_counts,
        "sagas": sagas,
        "saga_rows": [{"run": run, "since": short_age(now - run.updated_at)} for run in sagas.top],
        "incident_rows": [{"incident": i, "first_ago": short_age(now - i.first_seen_at),
                           "last_ago": short_age(now - i.last_seen_at)} for i in incidents.top],
        "charts": [(hourly, "chart-day", "Parked per hour, last 24 hours", "in the last 24 hours"),
                   (weekly, "chart-week", "Parked per 6 hours, last 7 days", "in the last 7 days")],
        "statuses": [{"status": s, "label": labels[s], "count": n,
                      "url": _changelist(status__exact=s)} for s, n in statuses.items()],
        "total_letters": sum(statuses.values()),
        "kinds": [{"row": k,
                   "day_url": _changelist(kind__exact=k.kind, last_failed_at__gte=day_ago),
                   "week_url": _changelist(kind__exact=k.kind, last_failed_at__gte=week_ago),
                   "parked_url": _changelist(kind__exact=k.kind, status__exact="parked",
                                             last_failed_at__gte=week_ago)}
                  for k in data.kind_counts(now)],
        "tasks": [{"row": t, "last_ago": short_age(now - t.last_failed_at),
                   "url": _changelist(task_name=t.task_name, last_failed_at__gte=day_ago)}
                  for t in data.top_tasks(now)],
        "fingerprints": [{"row": f, "url": reverse("admin:recovery_deadletter_group",
                                                   args=[f.fingerprint])}
                         for f in data.top_fingerprints(now)],
        "urls": {
            "parked": _changelist(status__exact="parked"),
            "letters": _changelist(),
            "groups": reverse("admin:recovery_deadletter_groups"),
            "incidents": reverse("admin:recovery_incident_changelist")
            + "?" + urlencode({"status__in": "open,acknowledged"}),
            "circuits": reverse("admin:recovery_sharedstate_changelist"),
            "sagas": reverse("admin:recovery_sagarun_changelist") + "?waiting=needs_human",
        },
    }
    return TemplateResponse(request, "admin/recovery/dashboard.html", context)


def install(site: AdminSite) -> None:
    """Serve the dashboard at ``<admin>/recovery/dashboard/`` (URL name
    ``admin:recovery_dashboard``) and link it from the index page, unless the site has its
    own index template. Call it before the URLconf is loaded (an ``AppConfig.ready``)."""
    if getattr(site, "_recovery_dashboard_installed", False):
        return
    site._recovery_dashboard_installed = True
    original = site.get_urls
    app_label = DeadLetter._meta.app_label

    def get_urls():
        return [path(f"{app_label}/dashboard/",
                     site.admin_view(partial(dashboard_view, site=site)),
                     name=f"{app_label}_dashboard"),
                *original()]

    site.get_urls = get_urls
    if site.index_template is None:
        site.index_template = "admin/recovery/index.html"
