"""What the on-call dashboard (``/admin/recovery/dashboard/``) shows, as plain data.

Each function answers one question with one or two queries that stay cheap at a million
dead letters, because each goes through an index of ``DeadLetter``:

- counts by status: one ``GROUP BY status`` (an index-only scan of
  ``recovery_dl_status_last``, or a sequential scan of the narrow columns; it is the only
  query whose cost grows with the whole table);
- everything about time (the charts, top tasks and fingerprints): a range scan of
  ``recovery_dl_last_failed`` over ``last_failed_at >= now - 7 days`` (or 24 hours), never
  the whole table; kinds: the same range on ``recovery_dl_kind_last``;
- what is still parked (per hour, per kind, the oldest letter): ``recovery_dl_status_last``
  with ``status = 'parked'`` (and the same time range, except for the oldest letter).

The views (:mod:`dlq_admin.views`) turn this into the page; nothing here knows about
HTML or URLs. ``now`` is a parameter everywhere so tests choose the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db.models import Case, Count, Max, Q, When
from django.db.models.functions import Trunc
from django.utils import timezone

from recovery.workflows import saga_secrets
from recovery.workflows.circuit import HALF_OPEN, OPEN, policy_for
from recovery.models import DeadLetter, Incident, SagaRun

from .groups import FailureGroup, groups as failure_groups, shown_messages
from .resilience import CircuitRow, circuit_row, known_circuits

__all__ = [
    "Bucket", "KindCount", "TaskCount", "OldestLetter", "IncidentSummary",
    "SagaSummary", "Level", "status_counts", "kind_counts", "parked_buckets", "parked_since",
    "top_tasks", "top_fingerprints", "oldest_parked", "open_incidents", "sagas_needing_human",
    "circuit_states", "levels", "GREEN", "AMBER", "RED",
]

GREEN, AMBER, RED = "green", "amber", "red"
PARKED = DeadLetter.Status.PARKED
OPEN_INCIDENT_STATUSES = (Incident.Status.OPEN, Incident.Status.ACKNOWLEDGED)

#: the same thresholds as the shipped alert rules (deploy/prometheus/alerts.yml)
GROWING_LETTERS_PER_HOUR = 25  # RecoveryDeadLetterQueueGrowing: > 25 more parked in 1 h
OLDEST_PARKED_TOO_OLD = timedelta(hours=24)  # RecoveryOldestDeadLetterTooOld: > 86400 s

#: most severe first
SEVERITY_ORDER = (Incident.Severity.CRITICAL, Incident.Severity.ERROR, Incident.Severity.WARNING)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else timezone.now()


# -- dead letters by status and kind ---------------------------------------------------------


def status_counts() -> dict[str, int]:
    """Letters per status, every status present (0 when none), in the model's order."""
    counts = dict.fromkeys(DeadLetter.Status.values, 0)
    rows = DeadLetter.objects.order_by().values_list("status").annotate(n=Count("*"))
    for status, n in rows:
        counts[status] = n
    return counts


@dataclass(frozen=True)
class KindCount:
    kind: str
    label: str
    last_24h: int  # letters of this kind that failed for good in the last 24 hours
    last_7d: int  # ... in the last 7 days
    parked_7d: int  # of the last 7 days' letters, those still parked


def kind_counts(now: datetime | None = None) -> list[KindCount]:
    """Per failure kind, the letters of the last 24 hours and 7 days (an index-only range
    scan of ``recovery_dl_kind_last`` per kind) and how many of the week's are still
    parked (the parked end of ``recovery_dl_status_last``); most in the week first, kinds
    with none left out. Never all parked letters by kind: that would read a heap page per
    parked letter, however old."""
    now = _now(now)
    day, week = now - timedelta(hours=24), now - timedelta(days=7)
    recent = (DeadLetter.objects.filter(kind__in=DeadLetter.Kind.values, last_failed_at__gte=week)
              .order_by().values_list("kind")
              # count(last_failed_at), not count(id): the index holds it, so no heap read
              .annotate(day=Count("last_failed_at", filter=Q(last_failed_at__gte=day)),
                        week=Count("*")))
    parked = dict(DeadLetter.objects.filter(status=PARKED, last_failed_at__gte=week).order_by()
                  .values_list("kind").annotate(n=Count("*")))
    labels = dict(DeadLetter.Kind.choices)
    found = [KindCount(kind, labels.get(kind, kind), n_day, n_week, parked.get(kind, 0))
             for kind, n_day, n_week in recent]
    return sorted(found, key=lambda k: (-k.last_7d, k.kind))


# -- parked over time -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """A span of time on a chart."""

    start: datetime
    end: datetime
    total: int  # letters whose last failure falls in it, whatever their status now
    parked: int  # of those, the ones still parked


def _hourly(since: datetime) -> tuple[dict[datetime, int], dict[datetime, int]]:
    """Letters per hour since ``since``: all of them, and those still parked. Two grouped
    range scans (``recovery_dl_last_failed`` and ``recovery_dl_status_last``), each able to
    answer from the index alone; at most 7 x 24 rows come back."""
    hour = Trunc("last_failed_at", "hour")
    letters = DeadLetter.objects.filter(last_failed_at__gte=since).order_by()
    total = dict(letters.annotate(hour=hour).values_list("hour").annotate(n=Count("*")))
    parked = dict(letters.filter(status=PARKED).annotate(hour=hour).values_list("hour")
                  .annotate(n=Count("*")))
    return total, parked


def _buckets(first: datetime, size: timedelta, count: int, total: dict[datetime, int],
             parked: dict[datetime, int]) -> list[Bucket]:
    """Sum hourly counts into ``count`` buckets of ``size`` from ``first`` (absolute time, so
    a daylight-saving change never shifts a bucket)."""
    # In UTC: arithmetic on two datetimes of the same zone is wall-clock arithmetic in
    # Python, which a daylight-saving change would skew by an hour.
    first = first.astimezone(dt_timezone.utc)
    starts = [first + size * i for i in range(count)]
    sums = [[0, 0] for _ in starts]
    for counts, column in ((total, 0), (parked, 1)):
        for hour, n in counts.items():
            index = int((hour - first) // size)
            if 0 <= index < count:
                sums[index][column] += n
    return [Bucket(start, start + size, t, p) for start, (t, p) in zip(starts, sums)]


def parked_buckets(now: datetime | None = None) -> tuple[list[Bucket], list[Bucket]]:
    """Letters parked per hour over the last 24 hours (24 buckets, the current hour last)
    and per 6 hours over the last 7 days (28 buckets, the current block last), from one
    hourly grouping of the last 7 days.

    Buckets follow the current time zone's clock: hours, and blocks starting at 00, 06, 12
    and 18 o'clock.
    """
    local = timezone.localtime(_now(now))
    this_hour = local.replace(minute=0, second=0, microsecond=0)
    this_block = this_hour.replace(hour=this_hour.hour - this_hour.hour % 6)
    hour, block = timedelta(hours=1), timedelta(hours=6)
    # Counted back in UTC, so 24 buckets are 24 real hours across a daylight-saving change.
    day_start = this_hour.astimezone(dt_timezone.utc) - 23 * hour
    week_start = this_block.astimezone(dt_timezone.utc) - 27 * block
    total, parked = _hourly(week_start)
    return (_buckets(day_start, hour, 24, total, parked),
            _buckets(week_start, block, 28, total, parked))


def parked_since(since: datetime) -> int:
    """Letters that failed for good since ``since`` (an index-only count on
    ``recovery_dl_last_failed``)."""
    return DeadLetter.objects.filter(last_failed_at__gte=since).order_by().count()


# -- top failing tasks and fingerprints -------------------------------------------------------


@dataclass(frozen=True)
class TaskCount:
    task_name: str
    total: int
    parked: int
    last_failed_at: datetime


def top_tasks(now: datetime | None = None, limit: int = 10) -> list[TaskCount]:
    """The tasks with the most letters in the last 24 hours, most first."""
    since = _now(now) - timedelta(hours=24)
    rows = (DeadLetter.objects.filter(last_failed_at__gte=since).order_by()
            .values("task_name")
            .annotate(total=Count("*"), parked=Count("pk", filter=Q(status=PARKED)),
                      last=Max("last_failed_at"))
            .order_by("-total", "task_name")[:limit])
    return [TaskCount(row["task_name"], row["total"], row["parked"], row["last"]) for row in rows]


def top_fingerprints(now: datetime | None = None, limit: int = 10) -> list[FailureGroup]:
    """The failures (fingerprints) with the most letters in the last 24 hours, most first,
    each with the message of its latest letter: the failure groups of the last day."""
    return failure_groups(status=None, limit=limit, since=_now(now) - timedelta(hours=24))


# -- the oldest parked letter ----------------------------------------------------------------


@dataclass(frozen=True)
class OldestLetter:
    pk: int
    task_name: str
    exception_type: str
    exception_message: str
    last_failed_at: datetime
    age: timedelta


def oldest_parked(now: datetime | None = None) -> OldestLetter | None:
    """The parked letter that has waited longest since it was parked (the end of
    ``recovery_dl_status_last`` for ``parked``); the same age as the metric
    ``recovery_dead_letters_oldest_parked_age_seconds``."""
    # Ordered by last_failed_at alone: with an id tie-break PostgreSQL would rather walk
    # recovery_dl_last_failed from the oldest letter of any status, through every
    # resolved one, than read the parked end of recovery_dl_status_last.
    row = (DeadLetter.objects.filter(status=PARKED).order_by("last_failed_at")
           .values("pk", "task_name", "exception_type", "last_failed_at")
           .first())
    if row is None:
        return None
    message = shown_messages([row["pk"]]).get(row["pk"], "")
    return OldestLetter(row["pk"], row["task_name"], row["exception_type"],
                        message[:200], row["last_failed_at"],
                        max(timedelta(0), _now(now) - row["last_failed_at"]))


# -- incidents, sagas, circuits --------------------------------------------------------------


@dataclass(frozen=True)
class IncidentSummary:
    """The incidents not yet resolved."""

    count: int
    unacknowledged: int
    by_severity: dict[str, int]
    highest_severity: str | None
    highest_unacknowledged: str | None
    top: list[Incident] = field(default_factory=list)


def open_incidents(limit: int = 10) -> IncidentSummary:
    """Incidents open or acknowledged: counts, and the ``limit`` that matter most
    (unacknowledged first, then by severity, then the most recently seen)."""
    unresolved = Incident.objects.filter(status__in=OPEN_INCIDENT_STATUSES)
    by_severity: dict[str, int] = {}
    unacknowledged: dict[str, int] = {}
    for status, severity, n in (unresolved.order_by().values_list("status", "severity")
                                .annotate(n=Count("*"))):
        by_severity[severity] = by_severity.get(severity, 0) + n
        if status == Incident.Status.OPEN:
            unacknowledged[severity] = unacknowledged.get(severity, 0) + n

    def highest(counts: dict[str, int]) -> str | None:
        return next((s for s in SEVERITY_ORDER if counts.get(s)), None)

    acknowledged_last = Case(When(status=Incident.Status.OPEN, then=0), default=1)
    severity_rank = Case(*(When(severity=s, then=i) for i, s in enumerate(SEVERITY_ORDER)),
                         default=len(SEVERITY_ORDER))
    top = list(unresolved.order_by(acknowledged_last, severity_rank, "-last_seen_at",
                                   "-id")[:limit])
    return IncidentSummary(sum(by_severity.values()), sum(unacknowledged.values()), by_severity,
                           highest(by_severity), highest(unacknowledged), top)


@dataclass(frozen=True)
class SagaSummary:
    count: int
    top: list[SagaRun] = field(default_factory=list)


def sagas_needing_human(limit: int = 10) -> SagaSummary:
    """Saga runs whose compensation failed for good (``needs_human``), newest first."""
    runs = SagaRun.objects.filter(status=SagaRun.Status.NEEDS_HUMAN)
    shown = list(runs.order_by("-created_at", "-id")[:limit])
    for run in shown:  # errors stored before they were scrubbed, too
        run.error = saga_secrets.scrub(run.error, saga_secrets.hidden(
            run, run.steps.exclude(result=None).values_list("result", flat=True)))
    return SagaSummary(runs.count(), shown)


def circuit_states() -> list[CircuitRow]:
    """Every known circuit and its state; ``unknown`` (with the error) when the shared
    store cannot be read. After the first circuit that cannot be read for that reason,
    the others are not tried: one connect timeout, not one per circuit."""
    rows: list[CircuitRow] = []
    down = ""
    for name in known_circuits():
        if down:
            rows.append(CircuitRow(name, "unknown", error=down))
            continue
        row = circuit_row(name)
        if row.error:
            try:
                policy_for(name)
            except Exception:  # noqa: BLE001 - only this circuit's policy is bad
                pass
            else:
                down = row.error
        rows.append(row)
    return rows


# -- red, amber, green -----------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One light of the status strip."""

    level: str  # GREEN | AMBER | RED
    why: str


def incident_level(summary: IncidentSummary) -> Level:
    if summary.highest_unacknowledged in (Incident.Severity.CRITICAL, Incident.Severity.ERROR):
        return Level(RED, f"an unacknowledged {summary.highest_unacknowledged} incident")
    if summary.count:
        return Level(AMBER, "every open incident is acknowledged or a warning")
    return Level(GREEN, "no open incident")


def parked_level(parked: int, last_hour: int) -> Level:
    if last_hour > GROWING_LETTERS_PER_HOUR:
        return Level(RED, f"more than {GROWING_LETTERS_PER_HOUR} letters in the last hour")
    if parked:
        return Level(AMBER, "letters wait for an operator")
    return Level(GREEN, "nothing parked")


def oldest_level(oldest: OldestLetter | None) -> Level:
    if oldest is None:
        return Level(GREEN, "nothing parked")
    if oldest.age > OLDEST_PARKED_TOO_OLD:
        return Level(RED, "parked more than 24 hours ago")
    return Level(AMBER, "parked less than 24 hours ago")


def circuit_level(rows: list[CircuitRow]) -> Level:
    states = {row.state for row in rows}
    if OPEN in states:
        return Level(RED, "a dependency is taken out of use")
    if HALF_OPEN in states or "unknown" in states:
        return Level(AMBER, "a circuit is half-open or its state is unknown")
    return Level(GREEN, "every circuit is closed")


def saga_level(summary: SagaSummary) -> Level:
    if summary.count:
        return Level(RED, "a compensation failed: data may be inconsistent")
    return Level(GREEN, "no saga run needs a human")


def levels(incidents: IncidentSummary, parked: int, last_hour: int, oldest: OldestLetter | None,
           circuits: list[CircuitRow], sagas: SagaSummary) -> dict[str, Level]:
    """The status strip's lights, by name."""
    return {
        "incidents": incident_level(incidents),
        "parked": parked_level(parked, last_hour),
        "oldest": oldest_level(oldest),
        "circuits": circuit_level(circuits),
        "sagas": saga_level(sagas),
    }
