"""The watchdog: find work that is stuck rather than failed, recover it where that is
safe, and escalate the rest (``recovery.observe.escalation``).

Celery beat runs the task ``recovery.watchdog`` every
``RECOVERY["WATCHDOG"]["INTERVAL_SECONDS"]`` (``recovery.setup`` adds the schedule
entry); ``manage.py watchdog`` runs one sweep by hand or from cron. A sweep runs four
checks, each in its own ``try`` (one that fails never stops the others):

1. **Stuck tasks.** Every worker's main process is asked over the broker which tasks
   its pool runs (``inspect().active()``: the main process answers even while its pool
   children hang). A task started longer ago than its deadline (the task's
   ``deadline_seconds``, else ``TASK_DEADLINE_SECONDS``) is escalated, one incident per
   task name (``watchdog:task:<name>``). It is not killed: ending a task half-way is
   not safe in general (the runbook says how to, when it is). A task whose own hard
   ``time_limit`` is not longer than its deadline is left to Celery, which kills it.
2. **Saga steps past their timeout.** A step (or compensation) still running longer
   after its dispatch than its ``Step(timeout_seconds=)`` (else
   ``SAGA_STEP_TIMEOUT_SECONDS``), which no worker holds, no delayed retry waits for,
   whose outbox intent was sent and which was not parked, lost its message: it is dispatched again under a
   new task id (``recovery.workflows.sagas.redispatch``; steps are idempotent, and the old
   message is stale from then on). After ``SAGA_STEP_MAX_REDISPATCHES`` of those it is
   escalated instead (``watchdog:saga_step:<saga>:<index>``); resolving that incident
   gives the step that many dispatches again.
3. **Letters left replaying.** A letter ``replaying`` for longer than
   ``REPLAYING_AFTER_SECONDS``, whose task no worker holds and no delayed retry waits
   for, never reported back (a worker died, the message was lost, a bulk replay was
   killed between its commit and its publish): it goes back to ``parked`` with a
   ``replay_lost`` event, and one incident lists them (``watchdog:replaying``). It is
   not published again: whether its replay ran is not known.
4. **Outbox intents not sent** after ``OUTBOX_AFTER_SECONDS``: the relay in every
   worker keeps trying, so the broker or the relays are broken; escalated with the
   count and the oldest age (``watchdog:outbox``).

"A worker holds it" covers what it runs, what it prefetched and what waits in its memory
for a countdown (``BrokerWorkers``). When that is not known (no worker answered, or a
worker stamped alive by ``recovery.delivery.presence`` did not), checks 2 and 3 take nothing for
lost this time, and the report says why (``Report.undecided``).

Two sweeps never overlap: on PostgreSQL a sweep holds an advisory lock, and a sweep
that cannot take it does nothing (``Report.skipped``).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, Protocol

from celery import Task, current_app, shared_task
from django.db import DatabaseError, connection, transaction
from django.db.models import Count, Max, Min, Q
from django.utils import timezone

from .. import conf
from ..core.brokers import delivered_queue
from ..workflows import broker_waits
from ..core.redaction import MASK, masked_payload
from ..core.task_modules import import_task_modules
from ..delivery import presence
from ..store.connections import discard_broken_connections
from ..store.models import (DeadLetter, DeadLetterEvent, DueRetry, Incident, OutboxMessage,
                            SagaEvent, SagaRun, SagaStep)
from ..workflows import sagas
from ..workflows.shared_state import store
from . import escalation
from ..core.names import logger_for

__all__ = ["TASK_NAME", "WatchdogPolicy", "Report", "Workers", "BrokerWorkers", "policy",
           "sweep", "stuck_tasks", "watchdog"]

logger = logger_for(__name__)

TASK_NAME = "recovery.watchdog"
ACTOR = "watchdog"
RUNBOOK = "docs/runbooks/watchdog-stuck-work.md"
#: most stuck items an incident lists (its details also give the full count)
LISTED = 50
#: most saga steps or letters one sweep acts on; the next sweep takes the rest
BATCH = 500
#: Pages of BATCH overdue saga steps one sweep looks at.
MAX_PAGES = 20
#: key of the PostgreSQL advisory lock that keeps two sweeps from overlapping
LOCK_KEY = zlib.crc32(TASK_NAME.encode())
#: Request.info()["time_start"] is a Unix time since Celery 5.3; anything before this is
#: not one (an older worker reports its monotonic clock)
_EPOCH_FLOOR = 946684800.0  # 2000-01-01
_FIRST_SEEN_KEY = "watchdog:first-seen"

_SECONDS = ("INTERVAL_SECONDS", "TASK_DEADLINE_SECONDS", "SAGA_STEP_TIMEOUT_SECONDS",
            "REPLAYING_AFTER_SECONDS", "OUTBOX_AFTER_SECONDS")


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchdogPolicy:
    """``RECOVERY["WATCHDOG"]`` merged over its defaults, as one immutable value.

    A limit of None turns its check off; for ``task_deadline_seconds`` and
    ``saga_step_timeout_seconds`` only the default is off, and tasks (steps) that set
    their own deadline (timeout) are still watched.
    """

    interval_seconds: float | None = 60.0
    task_deadline_seconds: float | None = 3600.0
    saga_step_timeout_seconds: float | None = 900.0
    saga_step_max_redispatches: int = 3
    replaying_after_seconds: float | None = 900.0
    outbox_after_seconds: float | None = 300.0
    inspect_timeout_seconds: float = 1.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "WatchdogPolicy":
        """Raises ValueError with a plain message naming the bad key."""
        merged = conf.merged("WATCHDOG", data)
        values: dict[str, Any] = {}
        for key in _SECONDS:
            value = merged[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise ValueError(f"{key} must be a positive number of seconds, or None to turn "
                                 f"it off, not {value!r}")
            values[key.lower()] = None if value is None else float(value)
        inspect_timeout = merged["INSPECT_TIMEOUT_SECONDS"]
        if (isinstance(inspect_timeout, bool) or not isinstance(inspect_timeout, (int, float))
                or inspect_timeout <= 0):
            raise ValueError(f"INSPECT_TIMEOUT_SECONDS must be a positive number of seconds, "
                             f"not {inspect_timeout!r}")
        values["inspect_timeout_seconds"] = float(inspect_timeout)
        redispatches = merged["SAGA_STEP_MAX_REDISPATCHES"]
        if isinstance(redispatches, bool) or not isinstance(redispatches, int) or redispatches < 0:
            raise ValueError(f"SAGA_STEP_MAX_REDISPATCHES must be an integer >= 0 (0 escalates "
                             f"without dispatching again), not {redispatches!r}")
        return cls(saga_step_max_redispatches=redispatches, **values)


def policy() -> WatchdogPolicy:
    """The current ``RECOVERY["WATCHDOG"]``; raises ValueError if it is invalid."""
    return WatchdogPolicy.from_dict(conf.get("WATCHDOG"))


# -- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What one sweep found, and did (a dry run only finds).

    Attributes:
        stuck_tasks: tasks running past their deadline (escalated).
        redispatched_steps: saga steps and compensations dispatched again.
        stuck_steps: saga steps escalated because their re-dispatches ran out.
        lost_replays: letters put back from ``replaying`` to ``parked``.
        unsent_outbox: outbox messages unsent past ``OUTBOX_AFTER_SECONDS``.
        failed_checks: the checks that raised (logged with their traceback), or that
            decided nothing because what the workers hold is not known.
        undecided: why nothing was taken for lost this time (a live worker did not
            answer, or none did); empty when the workers answered.
        skipped: another sweep was running; this one did nothing.
        dry_run: nothing was changed, dispatched or escalated.
    """

    stuck_tasks: int = 0
    redispatched_steps: int = 0
    stuck_steps: int = 0
    lost_replays: int = 0
    unsent_outbox: int = 0
    failed_checks: tuple[str, ...] = ()
    undecided: str = ""
    skipped: bool = False
    dry_run: bool = False

    @property
    def found(self) -> int:
        return (self.stuck_tasks + self.redispatched_steps + self.stuck_steps
                + self.lost_replays + self.unsent_outbox)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed_checks": list(self.failed_checks)}

    def summary(self) -> str:
        if self.skipped:
            return "watchdog: skipped, another sweep is running"
        prefix = "watchdog (dry run, nothing changed):" if self.dry_run else "watchdog:"
        parts = [f"{self.stuck_tasks} stuck task(s)",
                 f"{self.redispatched_steps} saga step(s) "
                 f"{'to dispatch' if self.dry_run else 'dispatched'} again",
                 f"{self.stuck_steps} stuck saga step(s)",
                 f"{self.lost_replays} lost replay(s)",
                 f"{self.unsent_outbox} unsent outbox message(s)"]
        text = f"{prefix} {', '.join(parts)}"
        if self.failed_checks:
            text += f"; checks that failed: {', '.join(self.failed_checks)}"
        if self.undecided:
            text += f"; took nothing for lost: {self.undecided}"
        return text


# -- asking the workers ---------------------------------------------------------------------


class Workers(Protocol):
    """What the workers hold right now."""

    def active(self) -> Mapping[str, list[dict]]:
        """Worker name -> ``Request.info()`` of each task its pool runs."""

    def holding(self, task_ids: Iterable[str]) -> set[str]:
        """The ids among ``task_ids`` that a worker runs, holds prefetched, or holds until
        a retry's ETA. Raises if the workers cannot be asked (the broker is down)."""


class WorkersUnreachable(RuntimeError):
    """What the workers hold is not known (none answered, or a live one did not): nothing
    is recovered this time."""


#: Celery's remote-control commands that list what a worker holds, in the order a request
#: moves through them (waiting for its ETA, prefetched, running): asked in that order, a
#: request that moves on between two questions is still seen by the later one.
_HOLDING = ("scheduled", "reserved", "active")


class BrokerWorkers:
    """The workers asked over the broker (Celery's remote control).

    What a worker holds is what it runs (``active``), what it prefetched (``reserved``)
    and what waits in its memory for a countdown or ETA (``scheduled``: retries and
    deferrals up to ``BROKER_DELAY_MAX_SECONDS``). The three lists are read from the
    worker's own sets and timer queue, not from its by-id index, which a retry's new
    message can lose to its old one finishing. They are asked once per sweep.

    A worker that does not answer within ``timeout`` seconds may still hold work. When
    one that is alive (``recovery.delivery.presence``: stamped within the last few heartbeats) is
    silent, or when none answers, :meth:`holding` raises :class:`WorkersUnreachable` and
    the checks that would act on the answer decide nothing this time.
    """

    def __init__(self, app: Any, timeout: float = 1.0,
                 alive: Callable[[], set[str]] | None = presence.alive) -> None:
        self.app = app
        self.timeout = timeout
        self.alive = alive
        self._active: dict[str, list[dict]] | None = None
        self._held: set[str] | None = None

    def active(self) -> Mapping[str, list[dict]]:
        if self._active is None:
            self._active = dict(self.app.control.inspect(timeout=self.timeout).active() or {})
        return self._active

    def holding(self, task_ids: Iterable[str]) -> set[str]:
        wanted = set(task_ids)
        if not wanted:
            return set()
        if self._held is None:
            self._held = self._ask()
        return self._held & wanted

    def _ask(self) -> set[str]:
        expected = set(self.alive() if self.alive is not None else ())
        # Stop waiting once every live worker answered; a silent one costs ``timeout``.
        limit = len(expected) or None
        held: set[str] = set()
        answered_all: set[str] | None = None
        answered_any: set[str] = set()
        for command in _HOLDING:
            inspect = self.app.control.inspect(timeout=self.timeout, limit=limit)
            replies = dict(getattr(inspect, command)() or {})
            answered_any |= set(replies)
            answered_all = set(replies) if answered_all is None else answered_all & set(replies)
            for entries in replies.values():
                for entry in entries if isinstance(entries, list) else ():
                    info = entry.get("request", entry) if isinstance(entry, Mapping) else {}
                    if isinstance(info, Mapping) and info.get("id"):
                        held.add(str(info["id"]))
        if not answered_any:
            # No worker answered (a deploy, a broker hiccup, main processes too busy):
            # "nobody holds it" is unknown, and acting on it could run work twice.
            raise WorkersUnreachable(f"no worker answered within {self.timeout:g}s")
        silent = (expected | answered_any) - (answered_all or set())
        if silent:
            raise WorkersUnreachable(
                f"{_plural(len(silent), 'live worker')} did not answer within "
                f"{self.timeout:g}s ({', '.join(sorted(silent))}); what they hold is unknown")
        return held


# -- the sweep ------------------------------------------------------------------------------


def sweep(app: Any = None, now: datetime | None = None, *, dry_run: bool = False,
          workers: Workers | None = None) -> Report:
    """Run every check once; returns what was found. Never raises.

    Args:
        app: the Celery app (default: the current one).
        now: the time the limits count back from (default: now).
        dry_run: find and report only: nothing is dispatched, parked or escalated.
        workers: who to ask what the workers hold (default: the app's workers, over the
            broker).
    """
    app = app or current_app
    now = now or timezone.now()
    try:
        chosen = policy()
    except ValueError as bad:
        logger.error("recovery: the watchdog is off, RECOVERY['WATCHDOG'] is invalid: %s", bad)
        return Report(failed_checks=("settings",), dry_run=dry_run)
    workers = workers or BrokerWorkers(app, timeout=chosen.inspect_timeout_seconds)
    counts: dict[str, int] = {}
    failed: list[str] = []
    undecided = ""
    try:
        with _exclusive() as acquired:
            if not acquired:
                logger.info("recovery: watchdog sweep skipped, the previous one is still running")
                return Report(skipped=True, dry_run=dry_run)
            for name, check in (("tasks", _check_tasks), ("saga_steps", _check_saga_steps),
                                ("replaying", _check_replaying), ("outbox", _check_outbox)):
                try:
                    counts.update(check(app, chosen, workers, now, dry_run))
                except WorkersUnreachable as unknown:
                    logger.warning("recovery: watchdog check %r took nothing for lost: %s",
                                   name, unknown)
                    failed.append(name)
                    undecided = str(unknown)
                except Exception as exc:  # noqa: BLE001 - a broken check never stops the others
                    logger.exception("recovery: watchdog check %r failed", name)
                    failed.append(name)
                    if isinstance(exc, DatabaseError):
                        _after_database_error()
    except DatabaseError as exc:  # the lock could not even be asked for
        logger.error("recovery: watchdog sweep not run, the database is unavailable: %s", exc)
        _after_database_error()
        return Report(failed_checks=("database",), dry_run=dry_run)
    report = Report(failed_checks=tuple(failed), undecided=undecided, dry_run=dry_run,
                    **counts)
    (logger.warning if report.found or failed else logger.info)("recovery: %s", report.summary())
    return report


@shared_task(name=TASK_NAME, ignore_result=True, base=Task)
def watchdog() -> dict[str, Any]:
    """One sweep, as Celery beat runs it. A plain Celery task: never retried, and a message
    older than one interval expires (the schedule entry sets ``expires``)."""
    return sweep().as_dict()


@contextmanager
def _exclusive() -> Iterator[bool]:
    """A session-level advisory lock on PostgreSQL (released when the sweep ends, or when
    its connection dies); elsewhere, always granted."""
    if connection.vendor != "postgresql":
        yield True
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        acquired = bool(cursor.fetchone()[0])
    try:
        yield acquired
    finally:
        if acquired:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
            except DatabaseError:
                # The session is gone, and its lock with it.
                _after_database_error()


def _after_database_error() -> None:
    discard_broken_connections()


def _fingerprint(*parts: Any) -> str:
    """``watchdog:...`` within the incident's 64 characters; a long one keeps a digest of
    the whole so that two long names stay two incidents."""
    text = ":".join(str(part) for part in parts)
    if len(text) <= 64:
        return text
    return f"{text[:55]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# -- 1. stuck tasks -------------------------------------------------------------------------


def _check_tasks(app: Any, chosen: WatchdogPolicy, workers: Workers, now: datetime,
                 dry_run: bool) -> dict[str, int]:
    stuck = stuck_tasks(workers.active(), app=app, policy=chosen, now=now)
    for name, items in stuck.items():
        deadline = items[0]["deadline_seconds"]
        ids = [item["task_id"] for item in items]
        logger.error("recovery: %s of %s running past the %gs deadline: %s",
                     _plural(len(items), "task"), name, deadline,
                     ", ".join(f"{item['task_id']} on {item['worker']} for "
                               f"{item['running_seconds']:.0f}s" for item in items[:LISTED]))
        if dry_run:
            continue
        escalation.escalate(escalation.Occurrence(
            fingerprint=_fingerprint("watchdog:task", name),
            reason=Incident.Reason.STUCK_TASK,
            title=f"{name}: {_plural(len(items), 'task')} running past the {deadline:g}s "
                  f"deadline ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})",
            task_name=name,
            queue=items[0]["queue"],
            details={
                "task": name,
                "deadline_seconds": deadline,
                "count": len(items),
                "task_ids": ids[:LISTED],
                "workers": sorted({item["worker"] for item in items}),
                "stuck": items[:LISTED],
                "seen_at": _iso(now),
                "to_end_one": f"celery -A <your app> control terminate SIGTERM {ids[0]} "
                              f"(read the runbook first)",
                "runbook": RUNBOOK,
            },
        ))
    return {"stuck_tasks": sum(len(items) for items in stuck.values())}


def stuck_tasks(replies: Mapping[str, Iterable[Mapping[str, Any]]], *, app: Any,
                policy: WatchdogPolicy, now: datetime) -> dict[str, list[dict]]:
    """The tasks of ``inspect().active()`` replies running past their deadline, by task
    name, oldest first; each as a JSON-ready dict with its worker, start, running time,
    deadline and masked arguments.

    ``time_start`` in a reply is a Unix time (Celery 5.3+ converts the pool's monotonic
    acceptance time to the wall clock in the worker's main process). A value that is not
    one (a worker of an older Celery) is replaced by the first time a sweep saw that task
    id running (kept in ``recovery.workflows.shared_state``), so such a task is reported a sweep
    interval or so late, never early.
    """
    now_ts = now.timestamp()
    deadlines: dict[str, float | None] = {}
    running: list[tuple[str, Mapping[str, Any]]] = []
    unknown_start: set[str] = set()
    for worker, requests in (replies or {}).items():
        for info in requests or ():
            name, task_id = info.get("name"), info.get("id")
            if not name or not task_id or name == TASK_NAME:
                continue
            if name not in deadlines:
                deadlines[name] = _deadline(app, name, policy)
            if deadlines[name] is None:
                continue
            running.append((worker, info))
            if _wall_clock(info.get("time_start"), now_ts) is None:
                unknown_start.add(task_id)
    first_seen = _first_seen(unknown_start, now_ts) if unknown_start else {}
    stuck: dict[str, list[dict]] = {}
    for worker, info in running:
        name, task_id = info["name"], info["id"]
        started = _wall_clock(info.get("time_start"), now_ts) or first_seen.get(task_id)
        if started is None:
            continue
        elapsed = now_ts - started
        if elapsed <= deadlines[name]:
            continue
        stuck.setdefault(name, []).append(_describe(app, worker, info, started, elapsed,
                                                    deadlines[name], task_id in unknown_start))
    for items in stuck.values():
        items.sort(key=lambda item: -item["running_seconds"])
    return stuck


def _deadline(app: Any, name: str, chosen: WatchdogPolicy) -> float | None:
    """How long a run of ``name`` may take before it is stuck; None: not watched."""
    task = app.tasks.get(name)
    if task is None:
        import_task_modules(app)
        task = app.tasks.get(name)
    own = getattr(task, "deadline_seconds", None)
    deadline = float(own) if own else chosen.task_deadline_seconds
    if deadline is None:
        return None
    hard_limit = getattr(task, "time_limit", None) or app.conf.task_time_limit
    if hard_limit and float(hard_limit) <= deadline:
        # Celery kills it at its hard time limit first (and RecoveryRequest requeues it,
        # then parks it past MAX_DELIVERIES): nothing for the watchdog to add.
        return None
    return deadline


def _wall_clock(value: Any, now_ts: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if _EPOCH_FLOOR < value <= now_ts + 300 else None


def _first_seen(task_ids: set[str], now_ts: float) -> dict[str, float]:
    """When a sweep first saw each of ``task_ids`` running; ids no longer asked about are
    forgotten."""
    def change(record: dict) -> dict[str, float]:
        for stale in set(record) - task_ids:
            del record[stale]
        for task_id in task_ids:
            record.setdefault(task_id, now_ts)
        return {task_id: float(record[task_id]) for task_id in task_ids}

    return store().update(_FIRST_SEEN_KEY, change)


def _describe(app: Any, worker: str, info: Mapping[str, Any], started: float, elapsed: float,
              deadline: float, estimated: bool) -> dict[str, Any]:
    args, kwargs = info.get("args"), info.get("kwargs")
    if isinstance(args, (list, tuple)) and isinstance(kwargs, Mapping):
        args, kwargs = masked_payload(info["name"], list(args), dict(kwargs), app)
    else:  # a repr (safe=True): cannot be masked key by key
        args, kwargs = MASK, MASK
    delivery = info.get("delivery_info") or {}
    return {
        "task": info["name"],
        "task_id": info["id"],
        "worker": info.get("hostname") or worker,
        "worker_pid": info.get("worker_pid"),
        "queue": delivered_queue(delivery),
        "started_at": datetime.fromtimestamp(started, tz=dt_timezone.utc).isoformat(),
        "started_at_estimated": estimated,
        # Rounded up: a task just past its deadline must not read as exactly at it.
        "running_seconds": math.ceil(elapsed * 10) / 10,
        "deadline_seconds": deadline,
        "args": args,
        "kwargs": kwargs,
    }


# -- 2. saga steps past their timeout -------------------------------------------------------


def _check_saga_steps(app: Any, chosen: WatchdogPolicy, workers: Workers, now: datetime,
                      dry_run: bool) -> dict[str, int]:
    totals = {"redispatched_steps": 0, "stuck_steps": 0}
    after = None
    # Page by page (oldest first): steps that used up their re-dispatches stay running
    # until a human acts, and must not hide the newer ones behind them.
    for _ in range(MAX_PAGES):
        overdue = _overdue_steps(chosen, now, after=after)
        if not overdue:
            break
        counts = _handle_overdue(overdue, chosen, workers, now, dry_run)
        for key, value in counts.items():
            totals[key] += value
        if len(overdue) < BATCH:
            break
        after = (overdue[-1]["dispatched_at"], overdue[-1]["pk"])
    return {key: value for key, value in totals.items() if value}


def _handle_overdue(overdue: list[dict], chosen: WatchdogPolicy, workers: Workers,
                    now: datetime, dry_run: bool) -> dict[str, int]:
    ids = {row["task_id"] for row in overdue}
    # Not lost: waiting for a delayed retry, not published yet (the outbox check's), or
    # parked without its run being told (recovery.workflows.sagas.reconcile records it).
    waiting = (set(DueRetry.objects.filter(task_id__in=ids).values_list("task_id", flat=True))
               | set(OutboxMessage.objects.filter(task_id__in=ids, sent_at__isnull=True)
                     .values_list("task_id", flat=True))
               | set(DeadLetter.objects.filter(task_id__in=ids, status=DeadLetter.Status.PARKED)
                     .values_list("task_id", flat=True)))
    waiting |= broker_waits.waiting(ids - waiting, now=now.timestamp())
    held = workers.holding(ids - waiting)
    redispatched = 0
    exhausted: dict[str, list[dict]] = {}
    for row in overdue:
        if row["task_id"] in waiting or row["task_id"] in held:
            continue
        fingerprint = _step_fingerprint(row)
        used = _redispatches(row, fingerprint)
        if used >= chosen.saga_step_max_redispatches:
            exhausted.setdefault(fingerprint, []).append({**row, "redispatches": used})
            continue
        if dry_run:
            redispatched += 1
            continue
        new_id = sagas.redispatch(row["pk"], task_id=row["task_id"],
                                  dispatched_before=now - timedelta(seconds=row["timeout"]),
                                  actor=ACTOR)
        if new_id is not None:
            redispatched += 1
    for fingerprint, rows in exhausted.items():
        _escalate_steps(fingerprint, rows, chosen, now, dry_run)
    return {"redispatched_steps": redispatched,
            "stuck_steps": sum(len(rows) for rows in exhausted.values())}


def _overdue_steps(chosen: WatchdogPolicy, now: datetime,
                   after: tuple[datetime, int] | None = None) -> list[dict]:
    """Running steps of running (or compensating) runs dispatched longer ago than their
    timeout, oldest first, at most ``BATCH``, after the ``(dispatched_at, pk)`` given."""
    rows = (SagaStep.objects
            .filter(status=SagaStep.Status.RUNNING, dispatched_at__isnull=False,
                    dispatched_at__lt=now,
                    run__status__in=(SagaRun.Status.RUNNING, SagaRun.Status.COMPENSATING)))
    if after is not None:
        rows = rows.filter(Q(dispatched_at__gt=after[0]) | Q(dispatched_at=after[0], pk__gt=after[1]))
    rows = (rows.order_by("dispatched_at", "pk")
            .values("pk", "run_id", "index", "role", "task_name", "task_id", "dispatches",
                    "attempts", "dispatched_at", "started_at", "run__name", "run__definition"))
    overdue = []
    for row in rows.iterator(chunk_size=200):
        timeout = (sagas.step_timeout_seconds(row.pop("run__definition"), row["index"])
                   or chosen.saga_step_timeout_seconds)
        if timeout is None or row["dispatched_at"] > now - timedelta(seconds=timeout):
            continue
        overdue.append({**row, "timeout": timeout})
        if len(overdue) >= BATCH:
            break
    return overdue


def _step_fingerprint(row: Mapping[str, Any]) -> str:
    parts = ["watchdog:saga_step", row["run__name"], row["index"]]
    if row["role"] != SagaStep.Role.STEP:
        parts.append(row["role"])
    return _fingerprint(*parts)


def _redispatches(row: Mapping[str, Any], fingerprint: str) -> int:
    """The watchdog's re-dispatches of this step of this run since its incident was last
    resolved (resolving it says "fixed: try again")."""
    events = SagaEvent.objects.filter(run_id=row["run_id"], action=SagaEvent.Action.REDISPATCHED,
                                      outcome__startswith=f"{row['role']} {row['index']} (")
    resolved = (Incident.objects.filter(fingerprint=fingerprint, status=Incident.Status.RESOLVED)
                .aggregate(last=Max("resolved_at"))["last"])
    if resolved is not None:
        events = events.filter(at__gt=resolved)
    return events.count()


def _escalate_steps(fingerprint: str, rows: list[dict], chosen: WatchdogPolicy, now: datetime,
                    dry_run: bool) -> None:
    first = rows[0]
    what = "compensation of step" if first["role"] == SagaStep.Role.COMPENSATION else "step"
    logger.error("recovery: saga %s %s %s (%s) stuck in %s after %d re-dispatch(es): %s",
                 first["run__name"], what, first["index"], first["task_name"],
                 _plural(len(rows), "run"), first["redispatches"],
                 ", ".join(row["task_id"] for row in rows[:LISTED]))
    if dry_run:
        return
    runs = [{
        "run": row["run_id"],
        "task_id": row["task_id"],
        "dispatched_at": _iso(row["dispatched_at"]),
        "started_at": _iso(row["started_at"]),
        "elapsed_seconds": round((now - row["dispatched_at"]).total_seconds(), 1),
        "dispatches": row["dispatches"],
        "attempts": row["attempts"],
        "redispatches": row["redispatches"],
        "link": escalation.admin_url(f"/admin/recovery/sagarun/{row['run_id']}/change/"),
    } for row in rows[:LISTED]]
    escalation.escalate(escalation.Occurrence(
        fingerprint=fingerprint,
        reason=Incident.Reason.STUCK_SAGA_STEP,
        title=f"Saga {first['run__name']} {what} {first['index']} ({first['task_name']}) stuck "
              f"in {_plural(len(rows), 'run')}: not finished {first['timeout']:g}s after its "
              f"dispatch, {first['redispatches']} re-dispatch(es) used",
        task_name=first["task_name"],
        details={
            "saga": first["run__name"],
            "step": first["index"],
            "role": first["role"],
            "task": first["task_name"],
            "timeout_seconds": first["timeout"],
            "max_redispatches": chosen.saga_step_max_redispatches,
            "count": len(rows),
            "task_ids": [row["task_id"] for row in rows[:LISTED]],
            "runs": runs,
            "runbook": RUNBOOK,
        },
        saga_run_id=first["run_id"],
    ))
    for row in rows:
        outcome = (f"watchdog: {row['role']} {row['index']} ({row['task_name']}) still running "
                   f"as {row['task_id']} ")
        try:
            if not SagaEvent.objects.filter(run_id=row["run_id"], action=SagaEvent.Action.ESCALATED,
                                            outcome__startswith=outcome).exists():
                SagaEvent.objects.create(
                    run_id=row["run_id"], action=SagaEvent.Action.ESCALATED, actor=ACTOR,
                    outcome=f"{outcome}after {row['redispatches']} re-dispatch(es)"[:255])
        except DatabaseError:
            logger.exception("saga run %s: could not record the escalation", row["run_id"])


# -- 3. letters left replaying --------------------------------------------------------------


def _check_replaying(app: Any, chosen: WatchdogPolicy, workers: Workers, now: datetime,
                     dry_run: bool) -> dict[str, int]:
    if chosen.replaying_after_seconds is None:
        return {}
    cutoff = now - timedelta(seconds=chosen.replaying_after_seconds)
    candidates = dict(DeadLetter.objects
                      .filter(status=DeadLetter.Status.REPLAYING, updated_at__lt=cutoff)
                      .order_by("updated_at").values_list("pk", "task_id")[:BATCH])
    if not candidates:
        return {}
    ids = set(candidates.values())
    busy = set(DueRetry.objects.filter(task_id__in=ids).values_list("task_id", flat=True))
    busy |= broker_waits.waiting(ids - busy, now=now.timestamp())
    busy |= workers.holding(ids - busy)
    pks = [pk for pk, task_id in candidates.items() if task_id not in busy]
    if not pks:
        return {}
    columns = ("pk", "task_id", "task_name", "replay_count", "updated_at", "queue")
    if dry_run:
        lost = list(DeadLetter.objects.filter(pk__in=pks).only(*columns))
    else:
        with transaction.atomic():
            # SKIP LOCKED and the conditions again: a replay that reports back right now
            # (its row locked, or already resolved or parked) wins.
            lost = list(DeadLetter.objects.select_for_update(skip_locked=True)
                        .filter(pk__in=pks, status=DeadLetter.Status.REPLAYING,
                                updated_at__lt=cutoff)
                        .only(*columns).order_by("pk"))
            if lost:
                DeadLetter.objects.filter(pk__in=[letter.pk for letter in lost]).update(
                    status=DeadLetter.Status.PARKED, updated_at=timezone.now())
                DeadLetterEvent.objects.bulk_create([DeadLetterEvent(
                    letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAY_LOST, actor=ACTOR,
                    outcome=(f"replay {letter.replay_count} never reported back "
                             f"(replaying since {letter.updated_at:%Y-%m-%d %H:%M:%S}, no worker "
                             f"holds {letter.task_id}); parked again, not published again")[:255],
                ) for letter in lost])
    if not lost:
        return {}
    logger.error("recovery: %s replaying for more than %gs never reported back%s: %s",
                 _plural(len(lost), "letter"), chosen.replaying_after_seconds,
                 "" if dry_run else "; parked again",
                 ", ".join(f"{letter.pk} ({letter.task_name})" for letter in lost[:LISTED]))
    if not dry_run:
        incident = escalation.escalate(escalation.Occurrence(
            fingerprint="watchdog:replaying",
            reason=Incident.Reason.STUCK_REPLAY,
            severity=Incident.Severity.WARNING,
            title=f"{_plural(len(lost), 'replayed letter')} never reported back; parked again",
            task_name=lost[0].task_name if len({letter.task_name for letter in lost}) == 1 else "",
            details={
                "count": len(lost),
                "replaying_after_seconds": chosen.replaying_after_seconds,
                "letters": [{
                    "letter": letter.pk,
                    "task": letter.task_name,
                    "task_id": letter.task_id,
                    "replay": letter.replay_count,
                    "replaying_since": _iso(letter.updated_at),
                    "link": escalation.admin_url(f"/admin/recovery/deadletter/{letter.pk}/change/"),
                } for letter in lost[:LISTED]],
                "runbook": RUNBOOK,
            },
        ))
        if incident is not None:
            try:
                incident.letters.add(*[letter.pk for letter in lost])
            except DatabaseError:
                logger.exception("recovery: could not link letters to incident %s", incident.pk)
    return {"lost_replays": len(lost)}


# -- 4. outbox intents not sent -------------------------------------------------------------


def _check_outbox(app: Any, chosen: WatchdogPolicy, workers: Workers, now: datetime,
                  dry_run: bool) -> dict[str, int]:
    if chosen.outbox_after_seconds is None:
        return {}
    cutoff = now - timedelta(seconds=chosen.outbox_after_seconds)
    unsent = OutboxMessage.objects.filter(sent_at__isnull=True, created_at__lt=cutoff)
    totals = unsent.aggregate(count=Count("pk"), oldest=Min("created_at"))
    count = totals["count"]
    if not count:
        return {}
    oldest_seconds = round((now - totals["oldest"]).total_seconds(), 1)
    by_task = dict(unsent.values_list("task_name").annotate(n=Count("pk")).order_by("-n")[:10])
    errors = dict(unsent.exclude(last_error="").values_list("last_error")
                  .annotate(n=Count("pk")).order_by("-n")[:5])
    logger.error("recovery: %s not sent for more than %gs (oldest %.0fs); last errors: %s",
                 _plural(count, "outbox message"), chosen.outbox_after_seconds, oldest_seconds,
                 "; ".join(errors) or "none recorded")
    if not dry_run:
        oldest = unsent.order_by("created_at", "pk").values(
            "task_id", "task_name", "created_at", "attempts", "last_error", "next_attempt_at")[:10]
        escalation.escalate(escalation.Occurrence(
            fingerprint="watchdog:outbox",
            reason=Incident.Reason.OUTBOX_STUCK,
            title=f"{_plural(count, 'outbox message')} not sent for more than "
                  f"{chosen.outbox_after_seconds:g}s (oldest {oldest_seconds:.0f}s): the broker "
                  f"or the workers' relays are down",
            details={
                "count": count,
                "oldest_created_at": _iso(totals["oldest"]),
                "oldest_age_seconds": oldest_seconds,
                "outbox_after_seconds": chosen.outbox_after_seconds,
                "by_task": dict(by_task),
                "last_errors": dict(errors),
                "oldest": [{**row, "created_at": _iso(row["created_at"]),
                            "next_attempt_at": _iso(row["next_attempt_at"])} for row in oldest],
                "runbook": RUNBOOK,
            },
        ))
    return {"unsent_outbox": count}
