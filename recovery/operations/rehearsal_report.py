"""What a rehearsal did: every run it hit, followed through retries, parking, escalation,
replay and compensation, with the time each step took; and the purge of what it left.

The report reads what the lifecycle already records (the injections, the letters and their
audit trail, incidents and their notifications, saga runs, result rows): a rehearsal adds
no bookkeeping of its own beyond the injection, so the report shows what production
would have shown.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from django.apps import apps
from django.db import transaction
from django.db.models import Q

from ..core import headers as hdr
from ..store.models import (DeadLetter, DeadLetterEvent, Incident, Rehearsal, RehearsalEvent,
                            RehearsalInjection, SagaRun, SagaStep)

__all__ = ["TaskOutcome", "RehearsalReport", "report", "format_report", "purge",
           "RehearsalRunning"]


class RehearsalRunning(RuntimeError):
    """A rehearsal still running cannot be purged: its next letters would be missed."""


@dataclass
class TaskOutcome:
    """One task a rehearsal hit, and what became of it."""

    task_id: str
    task_name: str
    hits: int
    first_hit_at: datetime
    outcome: str  # parked, replaying, resolved, discarded, compensated, succeeded, in flight
    retries: int = 0
    letter_id: int | None = None
    parked_at: datetime | None = None
    incidents: list[dict] = field(default_factory=list)  # id, opened_at, channels
    replayed_at: datetime | None = None
    resolved_at: datetime | None = None
    compensated_at: datetime | None = None
    saga_run_id: int | None = None

    def seconds(self, start: datetime | None, end: datetime | None) -> float | None:
        return None if start is None or end is None else max(0.0, (end - start).total_seconds())

    @property
    def to_park(self) -> float | None:
        return self.seconds(self.first_hit_at, self.parked_at)

    @property
    def to_escalate(self) -> float | None:
        opened = min((i["opened_at"] for i in self.incidents), default=None)
        return self.seconds(self.parked_at, opened)

    @property
    def to_replay(self) -> float | None:
        return self.seconds(self.parked_at, self.replayed_at)

    @property
    def to_resolve(self) -> float | None:
        return self.seconds(self.replayed_at or self.parked_at, self.resolved_at)

    @property
    def to_compensate(self) -> float | None:
        return self.seconds(self.first_hit_at, self.compensated_at)


@dataclass
class RehearsalReport:
    rehearsal: Rehearsal
    tasks: list[TaskOutcome]
    #: letters tagged with the rehearsal whose task id has no recorded injection (the
    #: injection's row was lost): shown, never silently dropped
    untracked_letters: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for task in self.tasks:
            found[task.outcome] = found.get(task.outcome, 0) + 1
        return found

    def to_dict(self) -> dict[str, Any]:
        r = self.rehearsal
        return {
            "rehearsal": {"id": r.pk, "task": r.task, "fault": r.fault, "rate": r.rate,
                          "kind": r.kind, "message": r.message, "started_at": r.started_at,
                          "expires_at": r.expires_at, "stopped_at": r.stopped_at,
                          "started_by": r.started_by, "stopped_by": r.stopped_by,
                          "running": r.is_running()},
            "counts": self.counts(),
            "tasks": [{**asdict(t), "seconds": {
                "injected_to_parked": t.to_park, "parked_to_escalated": t.to_escalate,
                "parked_to_replayed": t.to_replay, "to_resolved": t.to_resolve,
                "injected_to_compensated": t.to_compensate}} for t in self.tasks],
            "untracked_letters": self.untracked_letters,
        }


def _success_ids(task_ids: list[str]) -> set[str]:
    if not apps.is_installed("django_celery_results"):
        return set()
    task_result = apps.get_model("django_celery_results", "TaskResult")
    return set(task_result.objects.filter(task_id__in=task_ids, status="SUCCESS")
               .values_list("task_id", flat=True))


def report(rehearsal: Rehearsal) -> RehearsalReport:
    """Follow every run ``rehearsal`` hit (a few queries, whatever the number of tasks)."""
    rehearsal.refresh_from_db()  # a caller's copy may predate its stop
    hits: dict[str, list[RehearsalInjection]] = {}
    for injection in RehearsalInjection.objects.filter(rehearsal=rehearsal).order_by("at", "pk"):
        hits.setdefault(injection.task_id, []).append(injection)
    tag = str(rehearsal.pk)
    letters = {letter.task_id: letter for letter in DeadLetter.objects.filter(
        Q(rehearsal=tag) | Q(task_id__in=list(hits)))}
    untracked = sorted(letter.pk for task_id, letter in letters.items() if task_id not in hits)
    letter_ids = [letter.pk for letter in letters.values()]
    events: dict[int, dict[str, datetime]] = {}
    for event in (DeadLetterEvent.objects.filter(letter_id__in=letter_ids)
                  .order_by("at").values("letter_id", "action", "at")):
        events.setdefault(event["letter_id"], {}).setdefault(event["action"], event["at"])
    incidents: dict[int, list[dict]] = {}
    for incident in (Incident.objects.filter(letters__in=letter_ids).distinct()
                     .prefetch_related("notifications", "letters")):
        entry = {"id": incident.pk, "opened_at": incident.first_seen_at,
                 "status": incident.status,
                 "channels": sorted({f"{n.channel} ({n.status})"
                                     for n in incident.notifications.all()})}
        for letter in incident.letters.all():
            if letter.pk in letter_ids:
                incidents.setdefault(letter.pk, []).append(entry)
    steps = {step.task_id: step.run_id for step in SagaStep.objects.filter(task_id__in=list(hits))}
    runs = {run.pk: run for run in SagaRun.objects.filter(pk__in=set(steps.values()))}
    succeeded = _success_ids(list(hits))

    tasks = []
    for task_id, injections in hits.items():
        first = injections[0]
        letter = letters.get(task_id)
        outcome = TaskOutcome(task_id=task_id, task_name=first.task_name, hits=len(injections),
                              first_hit_at=first.at, outcome="in flight")
        run = runs.get(steps.get(task_id))
        if run is not None:
            outcome.saga_run_id = run.pk
            if run.status == SagaRun.Status.COMPENSATED:
                outcome.compensated_at = run.updated_at
        if letter is None:
            outcome.retries = len(injections)
            if task_id in succeeded:
                outcome.outcome = "succeeded"
        else:
            seen = events.get(letter.pk, {})
            outcome.letter_id = letter.pk
            outcome.parked_at = letter.first_failed_at
            outcome.retries = sum(1 for entry in letter.history or []
                                  if isinstance(entry, dict) and entry.get("delay_seconds") is not None)
            outcome.incidents = incidents.get(letter.pk, [])
            outcome.replayed_at = seen.get(DeadLetterEvent.Action.REPLAYED)
            outcome.outcome = letter.status
            if letter.status == DeadLetter.Status.RESOLVED:
                outcome.resolved_at = seen.get(DeadLetterEvent.Action.RESOLVED) or letter.updated_at
            if letter.status == DeadLetter.Status.COMPENSATED:
                outcome.compensated_at = seen.get(DeadLetterEvent.Action.COMPENSATED) or letter.updated_at
            if outcome.saga_run_id is None:
                saga = hdr.from_options(letter.headers, hdr.SAGA)
                if isinstance(saga, dict) and isinstance(saga.get("run"), int):
                    outcome.saga_run_id = saga["run"]
        if outcome.compensated_at is not None and outcome.outcome == "in flight":
            outcome.outcome = "compensated"
        tasks.append(outcome)
    return RehearsalReport(rehearsal, tasks, untracked)


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}s" if value < 10 else f"{value:.0f}s"


def _median(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return "-" if not present else f"{_secs(statistics.median(present))} (of {len(present)})"


def format_report(found: RehearsalReport) -> str:
    """The report as the on-call reads it after a game day."""
    r = found.rehearsal
    state = "running" if r.is_running() else f"ended {r.ended_at:%Y-%m-%d %H:%M:%S %Z}"
    lines = [
        f"Rehearsal {r.pk}: {r.fault} ({r.kind}) into {r.task} at rate {r.rate:g}, "
        f"started {r.started_at:%Y-%m-%d %H:%M:%S %Z} by {r.started_by}, {state}",
    ]
    if not found.tasks:
        lines.append("No run was hit.")
    counts = found.counts()
    lines.append(f"{sum(t.hits for t in found.tasks)} runs hit in {len(found.tasks)} tasks: "
                 + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    incidents = {i["id"]: i for t in found.tasks for i in t.incidents}
    for incident in incidents.values():
        lines.append(f"Incident #{incident['id']} ({incident['status']}), notified: "
                     f"{', '.join(incident['channels']) or 'no channel'}")
    lines.append("Median time: injected->parked " + _median([t.to_park for t in found.tasks])
                 + ", parked->escalated " + _median([t.to_escalate for t in found.tasks])
                 + ", parked->replayed " + _median([t.to_replay for t in found.tasks])
                 + ", ->resolved " + _median([t.to_resolve for t in found.tasks])
                 + ", injected->compensated " + _median([t.to_compensate for t in found.tasks]))
    if found.tasks:
        lines.append("")
        lines.append(f"{'task id':<38} {'task':<32} {'hits':>4} {'retries':>7} {'outcome':<12} "
                     f"{'letter':>7} {'parked':>7} {'escal.':>7} {'replay':>7} {'resolve':>7} "
                     f"{'compens.':>8}  incidents")
        for t in found.tasks:
            lines.append(
                f"{t.task_id:<38} {t.task_name[-32:]:<32} {t.hits:>4} {t.retries:>7} "
                f"{t.outcome:<12} {t.letter_id or '-':>7} {_secs(t.to_park):>7} "
                f"{_secs(t.to_escalate):>7} {_secs(t.to_replay):>7} {_secs(t.to_resolve):>7} "
                f"{_secs(t.to_compensate):>8}  "
                + (", ".join(f"#{i['id']}" for i in t.incidents) or "-"))
    if found.untracked_letters:
        lines.append(f"Letters tagged with this rehearsal but no recorded hit: "
                     f"{', '.join(map(str, found.untracked_letters))}")
    return "\n".join(lines)


def purge(rehearsal: Rehearsal, *, actor: str) -> dict[str, int]:
    """Delete the letters (with their audit trail) and the incidents the rehearsal left,
    and say so in its own audit trail. Refused while it runs."""
    rehearsal.refresh_from_db()
    if rehearsal.is_running():
        raise RehearsalRunning(f"rehearsal {rehearsal.pk} is still running: stop it first "
                               f"(manage.py rehearse stop {rehearsal.pk})")
    tag = str(rehearsal.pk)
    with transaction.atomic():
        incidents = Incident.objects.filter(rehearsal=tag)
        incident_count = incidents.count()
        incidents.delete()
        letters = DeadLetter.objects.filter(rehearsal=tag)
        letter_count = letters.count()
        letters.delete()
        RehearsalEvent.objects.create(
            rehearsal=rehearsal, action=RehearsalEvent.Action.PURGED, actor=actor[:150],
            note=f"{letter_count} letters and {incident_count} incidents deleted")
    return {"letters": letter_count, "incidents": incident_count}
