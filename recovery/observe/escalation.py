"""Escalation: turn failures that need a human into one incident each, and tell someone.

A parked letter escalates when its task is critical (first permanent failure), when
its failure fingerprint reaches ``THRESHOLD_LETTERS`` letters within
``THRESHOLD_MINUTES``, or when it is a failed compensation. Sagas (a compensation
that failed for good) and the watchdog (stuck work) escalate through :func:`escalate`.

One fingerprint has at most one open incident (a partial unique index): the first
occurrence opens it and queues one notification per channel
(:class:`~recovery.models.IncidentNotification`, unique per incident, channel and
event); later occurrences link their letters and raise the count, and notify nobody
again. Workers deliver the notifications (:mod:`recovery.observe.notify`) with backoff, so a
slow or failing channel never holds up parking. Sentry is told of every parked letter
directly (:mod:`recovery.observe.sentry` listens to ``letter_parked`` and
``incident_opened``): its SDK queues and sends in the background already.

Everything here runs after the letter is safely written and inside its own
``try``: escalation may be lost to a crash, a parked letter never is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from .. import conf, events
from ..core import headers as hdr, redaction
from ..core.bounds import attempt_count
from ..core.fingerprint import fingerprint
from ..store import pg_fastpath
from ..store.models import DeadLetter, Incident, IncidentNotification, SagaRun, SagaStep
from ..workflows import saga_secrets
from . import metrics
from ..core.names import logger_for

if TYPE_CHECKING:
    from ..store.parking import ParkRecord

__all__ = [
    "EscalationRules", "Occurrence", "rules", "on_parked", "on_saga_needs_human", "escalate",
    "acknowledge",
    "resolve", "letter_diagnostics", "admin_url", "OPEN_STATUSES",
]

logger = logger_for(__name__)

OPEN_STATUSES = (Incident.Status.OPEN, Incident.Status.ACKNOWLEDGED)


@dataclass(frozen=True)
class EscalationRules:
    """``RECOVERY["ESCALATION"]`` merged over its defaults, as one immutable value."""

    critical_tasks: frozenset[str] = frozenset()
    threshold_letters: int | None = 10
    threshold_minutes: float = 15.0
    on_compensation_failure: bool = True
    admin_base_url: str = ""
    sentry: bool = True
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_timeout_seconds: float = 5.0
    email: bool = True
    max_attempts: int = 12
    max_backoff_seconds: float = 600.0
    delivery_interval_seconds: float = 2.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EscalationRules":
        merged = conf.merged("ESCALATION", data)
        letters = merged["THRESHOLD_LETTERS"]
        if letters is not None and (not isinstance(letters, int) or letters < 1):
            raise ValueError(f"THRESHOLD_LETTERS must be a positive integer or None, not {letters!r}")
        minutes = float(merged["THRESHOLD_MINUTES"])
        if minutes <= 0:
            raise ValueError(f"THRESHOLD_MINUTES must be positive, not {merged['THRESHOLD_MINUTES']!r}")
        tasks = merged["CRITICAL_TASKS"] or ()
        if isinstance(tasks, str):
            raise ValueError("CRITICAL_TASKS must be a list of task names, not one string")
        url = merged["WEBHOOK_URL"] or None
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise ValueError(f"WEBHOOK_URL must be an http(s) URL, not {url!r}")
        if url is not None and not merged["WEBHOOK_SECRET"]:
            raise ValueError("WEBHOOK_URL needs WEBHOOK_SECRET: receivers verify the signature")
        attempts = int(merged["MAX_ATTEMPTS"])
        if attempts < 1:
            raise ValueError(f"MAX_ATTEMPTS must be at least 1, not {attempts!r}")
        return cls(
            critical_tasks=frozenset(str(t) for t in tasks),
            threshold_letters=letters,
            threshold_minutes=minutes,
            on_compensation_failure=bool(merged["ON_COMPENSATION_FAILURE"]),
            admin_base_url=str(merged["ADMIN_BASE_URL"] or "").rstrip("/"),
            sentry=bool(merged["SENTRY"]),
            webhook_url=url,
            webhook_secret=merged["WEBHOOK_SECRET"] or None,
            webhook_timeout_seconds=float(merged["WEBHOOK_TIMEOUT_SECONDS"]),
            email=bool(merged["EMAIL"]),
            max_attempts=attempts,
            max_backoff_seconds=float(merged["MAX_BACKOFF_SECONDS"]),
            delivery_interval_seconds=float(merged["DELIVERY_INTERVAL_SECONDS"]),
        )

    def channels(self) -> list[str]:
        """The notification channels that are switched on and configured."""
        chosen = []
        if self.webhook_url:
            chosen.append(IncidentNotification.Channel.WEBHOOK)
        if self.email and getattr(settings, "ADMINS", None):
            chosen.append(IncidentNotification.Channel.EMAIL)
        return chosen


def rules() -> EscalationRules:
    return EscalationRules.from_dict(conf.get("ESCALATION"))


@dataclass(frozen=True)
class Occurrence:
    """One thing that may open (or add to) an incident."""

    fingerprint: str
    reason: str
    title: str
    severity: str = Incident.Severity.ERROR
    task_name: str = ""
    kind: str = ""
    queue: str = ""
    details: dict = field(default_factory=dict)
    letter_id: int | None = None
    saga_run_id: int | None = None
    #: Earlier letters of the same occurrence (a threshold's window): linked and counted.
    letter_ids: tuple[int, ...] = ()
    #: The rehearsal whose injected fault this is ("" for a real failure).
    rehearsal: str = ""


def _one_line(text: str) -> str:
    """Titles go into mail subjects and ticket summaries: no newlines, bounded."""
    return " ".join(str(text).split())[:255]


# -- links and diagnostics -------------------------------------------------------------------


def admin_url(path: str, base: str | None = None) -> str:
    """``path`` under ``ADMIN_BASE_URL`` (absolute links for e-mail and tickets)."""
    base = rules().admin_base_url if base is None else base
    return f"{base}{path}" if base else path


def _reverse(name: str, args: Iterable[Any], fallback: str) -> str:
    # recovery never imports the admin; it only asks the URLconf for the page by name.

    try:
        return reverse(name, args=list(args))
    except NoReverseMatch:
        return fallback


def letter_links(letter_id: int | None, fingerprint: str, base: str) -> dict[str, str]:
    links = {"group": admin_url(_reverse("admin:recovery_deadletter_changelist", (),
                                         "/admin/recovery/deadletter/")
                                + f"?fingerprint={fingerprint}", base)}
    if letter_id is not None:
        links["letter"] = admin_url(_reverse("admin:recovery_deadletter_change", (letter_id,),
                                             f"/admin/recovery/deadletter/{letter_id}/change/"),
                                    base)
    return links


def incident_link(incident_id: int, base: str | None = None) -> str:
    return admin_url(_reverse("admin:recovery_incident_change", (incident_id,),
                              f"/admin/recovery/incident/{incident_id}/change/"), base)


def letter_diagnostics(record: "ParkRecord", letter_id: int | None, base: str = "") -> dict:
    """What an engineer needs to act on a letter, with secrets masked."""
    shown = redaction.shown_letter(record)
    return {
        "task": record.task_name,
        "task_id": record.task_id,
        "queue": record.queue,
        "worker": record.worker,
        "args": shown.args,
        "kwargs": shown.kwargs,
        "exception": {"type": record.exception_type, "message": shown.exception_message},
        "traceback": shown.traceback,
        "history": shown.history,
        "attempts": attempt_count(record.history),  # a bounded history counts its cut
        "classification": {"kind": record.kind, "permanent": record.permanent,
                           "reason": record.reason},
        "replay": record.replay,
        "failed_at": record.failed_at,
        "letter_id": letter_id,
        "links": letter_links(letter_id, _fingerprint(record), base),
    }


def _fingerprint(record: "ParkRecord") -> str:
    return fingerprint(record.task_name, record.exception_type, record.exception_message)


# -- rules -----------------------------------------------------------------------------------


def _is_critical(task_name: str, chosen: EscalationRules) -> bool:
    if task_name in chosen.critical_tasks:
        return True
    try:
        task = current_app.tasks.get(task_name)
    except Exception:  # noqa: BLE001 - an app that cannot load its tasks is not critical
        return False
    return bool(getattr(task, "critical", False))


def _compensation_failed(record: "ParkRecord") -> bool:
    if hdr.from_options(record.headers, hdr.COMPENSATES):
        return True
    # A saga's compensation escalates through recovery.workflows.sagas.escalate, with its run.
    return False


def _threshold_crossed(fp: str, chosen: EscalationRules) -> list[int]:
    """The ids of ``fp``'s letters within the window when they reach the threshold."""
    if chosen.threshold_letters is None:
        return []
    since = timezone.now() - timedelta(minutes=chosen.threshold_minutes)
    # All of the window's letters (up to a bound), not only N: letters parked at the same
    # instant by other workers, whose own check came a moment too early, belong to it too.
    # Letters of an incident already resolved were dealt with: they do not count again.
    # Letters of an open one do: a letter whose statement found no incident open, while
    # another worker was opening it with this window, joins that incident through _upsert.
    resolved = Incident.letters.through.objects.filter(
        incident__fingerprint=fp, incident__status=Incident.Status.RESOLVED)
    found = list(DeadLetter.objects.filter(fingerprint=fp, last_failed_at__gte=since)
                 .exclude(pk__in=resolved.values("deadletter_id"))
                 .order_by("-last_failed_at", "-id")
                 .values_list("id", flat=True)[: max(chosen.threshold_letters, _WINDOW_MAX)])
    return found if len(found) >= chosen.threshold_letters else []


#: The most letters an incident links when it opens (the rest join as they park).
_WINDOW_MAX = 1000


def on_parked(record: "ParkRecord", letter_id: int | None, **_: Any) -> None:
    """On ``letter_parked``: escalate the letter, if a rule says so. Never raises.

    ``letter_id`` is None while the letter sits in the spool: it escalates when the drain
    writes it (the event comes again, with its id).
    """
    try:
        chosen = rules()
    except ValueError as bad:
        logger.error("recovery: escalation is off, RECOVERY['ESCALATION'] is invalid: %s", bad)
        return
    if letter_id is None:
        return

    def run() -> None:
        try:
            _escalate_letter(record, letter_id, chosen)
        except Exception:  # noqa: BLE001
            logger.exception("recovery: could not escalate %s[%s]", record.task_name,
                             record.task_id)

    if connection.in_atomic_block:
        # The caller parks inside its own transaction: escalate once the letter is
        # committed, so an escalation error never aborts the caller's transaction and no
        # incident lock is held until the caller commits.
        transaction.on_commit(run, robust=True)
    else:
        run()


def _escalate_letter(record: "ParkRecord", letter_id: int, chosen: EscalationRules) -> None:
    fp = _fingerprint(record)

    def details() -> dict:
        return letter_diagnostics(record, letter_id, chosen.admin_base_url)

    link = pg_fastpath.take_incident_link(letter_id)
    if link is not None:
        # The letter's own statement looked for the open incident and, if there was one,
        # linked and counted the letter there already.
        if link.incident_id is not None:
            if link.moved_last_seen:
                _write_details(link.incident_id, details)
            return
    elif _add_to_open(fp, letter_id, details):
        # The same problem is already in front of a human: add to it, announce nothing.
        return
    if chosen.on_compensation_failure and _compensation_failed(record):
        reason, severity, window = Incident.Reason.COMPENSATION_FAILED, Incident.Severity.CRITICAL, []
        title = f"Compensation {record.task_name} failed: "
    elif _is_critical(record.task_name, chosen):
        reason, severity, window = Incident.Reason.CRITICAL_TASK, Incident.Severity.CRITICAL, []
        title = f"Critical task {record.task_name} failed: "
    else:
        window = _threshold_crossed(fp, chosen)
        if not window:
            return
        reason, severity = Incident.Reason.THRESHOLD, Incident.Severity.ERROR
        title = (f"{record.task_name}: {len(window)} dead letters in "
                 f"{chosen.threshold_minutes:g} min: ")
    diagnostics = details()
    exception = diagnostics["exception"]
    title += f"{exception['type'].rsplit('.', 1)[-1]}: {exception['message']}"
    if record.rehearsal:
        # Whoever is paged must see at once that this one was caused on purpose.
        title = f"[rehearsal {record.rehearsal}] {title}"
    _upsert(Occurrence(
        fingerprint=fp, reason=reason, severity=severity, title=title,
        task_name=record.task_name, kind=record.kind, queue=record.queue, details=diagnostics,
        letter_id=letter_id, letter_ids=tuple(window), rehearsal=record.rehearsal), chosen)


def escalate(occurrence: Occurrence) -> Incident | None:
    """Open an incident for ``occurrence``, or add to the one open for its fingerprint.

    The hook for sagas, the watchdog and project code. Never raises: returns None when
    the incident could not be written (the reason is logged).
    """
    try:
        chosen = rules()
        incident, opened = _upsert(occurrence, chosen)
    except Exception:  # noqa: BLE001
        logger.exception("recovery: could not escalate %s", occurrence.title or occurrence.fingerprint)
        return None
    return incident


def on_saga_needs_human(run: SagaRun, reason: str, failed_step: SagaStep | None = None,
                        hidden: Any = (), **_: Any) -> None:
    """On ``saga_needs_human``: one incident per run left half undone
    (``RECOVERY["ESCALATION"]["ON_COMPENSATION_FAILURE"]``), linked to the run."""
    metrics.saga_escalated(run.name)
    try:
        if not rules().on_compensation_failure:
            return
    except ValueError:
        return
    failed = failed_step
    escalate(Occurrence(
        # One incident per run: each run left half undone needs its own fix.
        fingerprint=f"saga:{run.pk}:compensation_failed:{run.name}"[:64],
        reason=Incident.Reason.COMPENSATION_FAILED,
        severity=Incident.Severity.CRITICAL,
        title=f"Saga {run.name} run {run.pk} needs a human: {reason}"[:255],
        task_name=failed.task_name if failed else "",
        details={
            "saga": run.name, "run": run.pk, "status": run.status, "reason": reason,
            "failed_step": ({"index": failed.index, "role": failed.role, "task": failed.task_name,
                             "task_id": failed.task_id,
                             "error": saga_secrets.scrub(failed.error, hidden)} if failed else None),
            "context": saga_secrets.masked(run, run.context),
            "runbook": "docs/runbooks/saga-compensation-failed.md",
            "links": {"run": admin_url(f"/admin/recovery/sagarun/{run.pk}/change/")},
        },
        saga_run_id=run.pk,
    ))


def _add_to_open(fp: str, letter_id: int, details: Callable[[], dict]) -> bool:
    """Add a letter to its fingerprint's open incident, if there is one.

    A storm of one failure runs this for every letter, so it must stay cheap: on
    PostgreSQL one statement finds, links (once per letter), counts and touches, and the
    diagnostics of the latest letter (a traceback) are built and written at most once a
    second.
    """
    now = timezone.now()
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        link = pg_fastpath.link_to_open_incident(letter_id, fp)
        if link.incident_id is None:
            return False
        if link.moved_last_seen:
            _write_details(link.incident_id, details)
        return True
    incident_id = (Incident.objects.filter(fingerprint=fp, status__in=OPEN_STATUSES)
                   .values_list("pk", flat=True).first())
    if incident_id is None:
        return False
    with transaction.atomic():
        new = _link(incident_id, {letter_id})
        Incident.objects.filter(pk=incident_id).update(
            count=F("count") + new, last_seen_at=now, details=details())
    return True


def _write_details(incident_id: int, details: Callable[[], dict]) -> None:
    Incident.objects.filter(pk=incident_id).update(details=details())


def _link(incident_id: int, letter_ids: set[int]) -> int:
    """Link letters to an incident; returns how many were not linked yet.

    An incident of letters counts each letter once (one parked twice, or seen by two
    workers at once, is one occurrence), without counting its links on every park: a
    storm of one failure must not cost more per letter as it grows.
    """
    through = Incident.letters.through
    known = set(through.objects.filter(incident_id=incident_id, deadletter_id__in=letter_ids)
                .values_list("deadletter_id", flat=True))
    new = letter_ids - known
    through.objects.bulk_create([through(incident_id=incident_id, deadletter_id=pk)
                                 for pk in new], ignore_conflicts=True)
    return len(new)


def _upsert(occurrence: Occurrence, chosen: EscalationRules) -> tuple[Incident, bool]:
    now = timezone.now()
    opened = False
    with transaction.atomic():
        incident = (Incident.objects.select_for_update()
                    .filter(fingerprint=occurrence.fingerprint, status__in=OPEN_STATUSES).first())
        if incident is None:
            try:
                with transaction.atomic():
                    incident = Incident.objects.create(
                        fingerprint=occurrence.fingerprint, reason=occurrence.reason,
                        severity=occurrence.severity, title=_one_line(occurrence.title),
                        count=max(1, len(set(occurrence.letter_ids) | (
                            {occurrence.letter_id} if occurrence.letter_id else set()))),
                        task_name=occurrence.task_name[:255], kind=occurrence.kind[:32],
                        queue=occurrence.queue[:255], details=occurrence.details,
                        saga_run_id=occurrence.saga_run_id, first_seen_at=now, last_seen_at=now,
                        rehearsal=occurrence.rehearsal[:32],
                    )
                    opened = True
            except IntegrityError:
                # Another worker opened it a moment ago: add to theirs.
                incident = (Incident.objects.select_for_update()
                            .get(fingerprint=occurrence.fingerprint, status__in=OPEN_STATUSES))
        linked = set(occurrence.letter_ids)
        if occurrence.letter_id is not None:
            linked.add(occurrence.letter_id)
        new = _link(incident.pk, linked) if linked else 0
        if not opened:
            # An incident of letters counts its letters; any other, its occurrences.
            Incident.objects.filter(pk=incident.pk).update(
                count=F("count") + (new if linked else 1), last_seen_at=now,
                details=occurrence.details)
        if opened:
            IncidentNotification.objects.bulk_create(
                [IncidentNotification(incident=incident, channel=channel,
                                      event=IncidentNotification.Event.OPENED)
                 for channel in chosen.channels()],
                ignore_conflicts=True,
            )
    if opened:
        metrics.incident_opened(occurrence.reason, occurrence.severity)
        log = logger.critical if occurrence.severity == Incident.Severity.CRITICAL else logger.error
        log("recovery: incident #%s opened (%s): %s (%s)", incident.pk, occurrence.reason,
            occurrence.title, incident_link(incident.pk, chosen.admin_base_url))
        events.incident_opened.send(incident=incident, occurrence=occurrence, rules=chosen)
    return incident, opened


# -- operator actions ------------------------------------------------------------------------


def acknowledge(incident: Incident | int, *, actor: str, note: str = "") -> Incident:
    """Someone is on it: the incident stays open (and keeps deduplicating) but is owned."""
    with transaction.atomic():
        incident = Incident.objects.select_for_update().get(
            pk=incident.pk if isinstance(incident, Incident) else incident)
        if incident.status == Incident.Status.OPEN:
            incident.status = Incident.Status.ACKNOWLEDGED
            incident.acknowledged_at = timezone.now()
            incident.acknowledged_by = actor[:150]
            if note:
                incident.note = f"{incident.note}\n{note}".strip()
            incident.save()
    return incident


def resolve(incident: Incident | int, *, actor: str, note: str = "") -> Incident:
    """Close the incident; the next occurrence of its fingerprint opens a new one.

    Channels that were told of the opening are told of the resolution (a ticket bridge
    closes its ticket); resolving twice notifies once.
    """
    with transaction.atomic():
        incident = Incident.objects.select_for_update().get(
            pk=incident.pk if isinstance(incident, Incident) else incident)
        if incident.status == Incident.Status.RESOLVED:
            return incident
        incident.status = Incident.Status.RESOLVED
        incident.resolved_at = timezone.now()
        incident.resolved_by = actor[:150]
        if note:
            incident.note = f"{incident.note}\n{note}".strip()
        incident.save()
        told = set(incident.notifications.filter(event=IncidentNotification.Event.OPENED)
                   .values_list("channel", flat=True))
        IncidentNotification.objects.bulk_create(
            [IncidentNotification(incident=incident, channel=channel,
                                  event=IncidentNotification.Event.RESOLVED)
             for channel in told if channel == IncidentNotification.Channel.WEBHOOK],
            ignore_conflicts=True,
        )
    metrics.incident_resolved(incident.reason)
    return incident
