"""Failure rehearsals: inject a fault into matching tasks, for a while, on purpose.

A team proves, before production does it for them, that a permanent failure of a
dependency is retried, parked, escalated and replayable, and that compensations undo
partial work. An operator starts a rehearsal (``manage.py rehearse start`` or the admin);
every worker then reads the running rehearsals from the shared store (Redis, or the
database on the embedded default) at most once a second per process, and
:meth:`RecoveryTask.__call__` hits a matching run with the declared probability before
its body runs. The injected failure then goes through the real lifecycle (classifier,
policy, circuit, parking, escalation), which is the point.

Safety, in order: nothing is injected unless ``RECOVERY["REHEARSALS_ENABLED"]`` (a system
check warns when it is on with ``DEBUG`` off); every rehearsal expires by itself (24 hours
at most) and workers honour the expiry without being told; a store that cannot be read
means no injection, never a failed task; starting, stopping and purging are audit events.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from django.db import transaction
from django.utils import timezone

from .. import conf, events
from ..core import headers as hdr
from ..core.errors import RehearsalFault, RehearsedTimeLimit
from ..core.kinds import FailureKind
from ..store.models import Rehearsal, RehearsalEvent, RehearsalInjection
from . import shared_state

__all__ = ["MAX_DURATION", "READ_INTERVAL_SECONDS", "ActiveRehearsal", "RehearsalFault",
           "RehearsedTimeLimit", "RehearsalsDisabled", "enabled", "validate", "start", "stop", "running",
           "active", "inject", "parse_duration", "publish", "injected_into"]

logger = logging.getLogger(__name__)

#: No rehearsal may run longer: a forgotten one must not outlive a working day.
MAX_DURATION = timedelta(hours=24)
#: How stale a worker's view of the running rehearsals may be: one store read a second per
#: process at most, never one per task.
READ_INTERVAL_SECONDS = 1.0
#: The shared-store record every worker reads.
STORE_KEY = "rehearsals"
FAULTS = tuple(Rehearsal.Fault.values)
#: What an injected failure may be classified as (poison is a message no task can read).
KINDS = tuple(k.value for k in FailureKind if k is not FailureKind.POISON)


class RehearsalsDisabled(RuntimeError):
    """``RECOVERY["REHEARSALS_ENABLED"]`` is off: this environment refuses rehearsals."""


@dataclass(frozen=True)
class ActiveRehearsal:
    """A running rehearsal as workers see it (from the shared store)."""

    id: int
    task: str
    fault: str
    rate: float
    kind: str
    message: str
    expires_at: float  # epoch seconds

    def matches(self, task_name: str) -> bool:
        return fnmatch.fnmatchcase(task_name, self.task)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "fault": self.fault, "rate": self.rate,
                "kind": self.kind, "message": self.message, "expires_at": self.expires_at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActiveRehearsal":
        return cls(id=int(data["id"]), task=str(data["task"]), fault=str(data["fault"]),
                   rate=float(data["rate"]), kind=str(data.get("kind") or "dependency"),
                   message=str(data.get("message") or ""), expires_at=float(data["expires_at"]))

    @classmethod
    def of(cls, rehearsal: Rehearsal) -> "ActiveRehearsal":
        return cls(id=rehearsal.pk, task=rehearsal.task, fault=rehearsal.fault,
                   rate=rehearsal.rate, kind=rehearsal.kind, message=rehearsal.message,
                   expires_at=rehearsal.expires_at.timestamp())


def enabled() -> bool:
    return bool(conf.get("REHEARSALS_ENABLED"))


# -- starting and stopping (the operator's side) -----------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h`` (or a bare number of seconds) as a duration within
    (0, 24 h]; ValueError with the reason otherwise."""
    value = (text or "").strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: write 30s, 10m or 2h") from None
    duration = timedelta(seconds=seconds)
    _check_duration(duration)
    return duration


def _check_duration(duration: timedelta) -> None:
    if duration <= timedelta(0):
        raise ValueError("a rehearsal must run for a positive time")
    if duration > MAX_DURATION:
        raise ValueError("a rehearsal runs 24 hours at most (it must end by itself)")


def _registered_task_names() -> list[str] | None:
    """The task names the Celery app knows, its modules imported; None if it cannot say."""
    try:
        current_app.loader.import_default_modules()
        return sorted(name for name in current_app.tasks if not name.startswith("celery."))
    except Exception:  # noqa: BLE001 - an app that cannot load its tasks cannot check names
        logger.warning("recovery: could not list the registered tasks to check a rehearsal's "
                       "task name", exc_info=True)
        return None


def _check_task(task: str) -> None:
    if not task or len(task) > 255:
        raise ValueError("--task is a task name or a pattern of task names, 1 to 255 characters")
    names = _registered_task_names()
    if names is None or any(fnmatch.fnmatchcase(name, task) for name in names):
        return
    close = difflib.get_close_matches(task, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"{task!r} matches no registered task{hint}")


def validate(*, task: str, fault: str, rate: Any, duration: timedelta,
             kind: str = FailureKind.DEPENDENCY.value, message: str = "") -> float:
    """Check a rehearsal request without starting it (the admin's form, then :func:`start`);
    returns the rate as a number. Raises ValueError naming what is wrong."""
    if fault not in FAULTS:
        raise ValueError(f"--fault must be one of {', '.join(FAULTS)}, not {fault!r}")
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"--rate must be a number in (0, 1], not {rate!r}") from None
    if not 0 < rate <= 1:
        raise ValueError(f"--rate must be in (0, 1], not {rate:g}")
    _check_duration(duration)
    if len(message or "") > 255:
        raise ValueError("--message is 255 characters at most")
    _check_task(task)
    return rate


def start(*, task: str, fault: str, rate: float, duration: timedelta, actor: str,
          kind: str = FailureKind.DEPENDENCY.value, message: str = "") -> Rehearsal:
    """Start a rehearsal and tell the workers. Raises :class:`RehearsalsDisabled`, or
    ValueError naming what is wrong with the request."""
    if not enabled():
        raise RehearsalsDisabled(
            "rehearsals are off here: set RECOVERY['REHEARSALS_ENABLED'] = True in a "
            "non-production environment")
    rate = validate(task=task, fault=fault, rate=rate, duration=duration, kind=kind,
                    message=message)
    now = timezone.now()
    with transaction.atomic():
        rehearsal = Rehearsal.objects.create(
            task=task, fault=fault, rate=rate, kind=kind, message=message, started_at=now,
            expires_at=now + duration, started_by=actor[:150])
        RehearsalEvent.objects.create(
            rehearsal=rehearsal, action=RehearsalEvent.Action.STARTED, actor=actor[:150], at=now,
            note=f"{fault} into {task} at rate {rate:g} for {duration}")
    publish()
    logger.warning("recovery: rehearsal %s started by %s: %s into %s at rate %g until %s",
                   rehearsal.pk, actor, fault, task, rate, rehearsal.expires_at.isoformat())
    return rehearsal


def stop(ids: Iterable[int] | None, *, actor: str) -> list[Rehearsal]:
    """Stop the running rehearsals ``ids`` (all of them when None); returns those stopped.
    Stopping one that has already ended changes nothing and is not an error."""
    now = timezone.now()
    with transaction.atomic():
        query = Rehearsal.objects.select_for_update().filter(stopped_at__isnull=True,
                                                               expires_at__gt=now)
        if ids is not None:
            query = query.filter(pk__in=list(ids))
        stopped = list(query)
        for rehearsal in stopped:
            rehearsal.stopped_at, rehearsal.stopped_by = now, actor[:150]
            rehearsal.save(update_fields=["stopped_at", "stopped_by"])
            RehearsalEvent.objects.create(rehearsal=rehearsal, action=RehearsalEvent.Action.STOPPED,
                                          actor=actor[:150], at=now)
    publish()
    for rehearsal in stopped:
        logger.warning("recovery: rehearsal %s stopped by %s", rehearsal.pk, actor)
    return stopped


def running(now: datetime | None = None) -> list[Rehearsal]:
    """The rehearsals running now, as the database has them (the dashboard's banner)."""
    return list(Rehearsal.objects.filter(stopped_at__isnull=True,
                                         expires_at__gt=now or timezone.now()))


def publish() -> None:
    """Write the running rehearsals to the shared store, where workers read them. Called on
    every start and stop; a store that refuses leaves workers on the last record, which
    still expires by itself."""
    current = [ActiveRehearsal.of(r).to_dict() for r in running()]
    remaining = max((r["expires_at"] - time.time() for r in current), default=0)

    def replace(record: dict) -> None:
        record.clear()
        record["rehearsals"] = current

    shared_state.store().update(STORE_KEY, replace, expires_in=max(60.0, remaining + 60))
    _cache.clear()


# -- the worker's side ---------------------------------------------------------------------------

_cache: dict[str, Any] = {}
_cache_lock = threading.Lock()


def _read() -> tuple[ActiveRehearsal, ...]:
    try:
        record = shared_state.store().get(STORE_KEY)
        return tuple(ActiveRehearsal.from_dict(item) for item in record.get("rehearsals") or ())
    except Exception as exc:  # noqa: BLE001 - a rehearsal never fails a task; it just stops
        if time.monotonic() - _cache.get("warned", -3600.0) > 60:
            _cache["warned"] = time.monotonic()
            logger.warning("recovery: could not read the running rehearsals (%s); injecting "
                           "nothing until the store answers", exc)
        return ()


def active() -> tuple[ActiveRehearsal, ...]:
    """The rehearsals running now, as this process last read them (at most a second ago)."""
    if not enabled():
        return ()
    now = time.monotonic()
    if now - _cache.get("read_at", -READ_INTERVAL_SECONDS) >= READ_INTERVAL_SECONDS:
        with _cache_lock:
            if now - _cache.get("read_at", -READ_INTERVAL_SECONDS) >= READ_INTERVAL_SECONDS:
                _cache["rehearsals"] = _read()
                _cache["read_at"] = time.monotonic()
    wall = time.time()
    return tuple(r for r in _cache.get("rehearsals", ()) if r.expires_at > wall)


def _choose(task_name: str) -> ActiveRehearsal | None:
    for rehearsal in active():
        if rehearsal.matches(task_name) and random.random() < rehearsal.rate:
            return rehearsal
    return None


def inject(task: Any, request: Any) -> None:
    """Hit this run with a running rehearsal's fault, if one matches and its dice say so.

    Called by ``RecoveryTask.__call__`` just before the body. Raises the injected failure
    (permanent, transient, timeout), hangs until a time limit or the rehearsal's end, or
    kills the process; returns when nothing is injected. The run is tagged first (the
    ``recovery_rehearsal`` header its retries carry), so its letter says which rehearsal
    parked it.
    """
    chosen = _choose(task.name)
    if chosen is None:
        return
    setattr(request, hdr.REHEARSAL, str(chosen.id))
    _record(chosen, request.id, task.name)
    text = (f"rehearsal {chosen.id}: injected {chosen.fault} failure"
            + (f": {chosen.message}" if chosen.message else ""))
    if chosen.fault == Rehearsal.Fault.PERMANENT:
        raise RehearsalFault(text, kind=chosen.kind, permanent=True)
    if chosen.fault == Rehearsal.Fault.TRANSIENT:
        raise RehearsalFault(text, kind=chosen.kind, permanent=False)
    if chosen.fault == Rehearsal.Fault.TIMEOUT:
        raise RehearsedTimeLimit(text)
    if chosen.fault == Rehearsal.Fault.HANG:
        _hang(chosen, task, request)
        return
    if chosen.fault == Rehearsal.Fault.KILL:
        logger.warning("%s[%s]: %s: killing this process", task.name, request.id, text)
        os.kill(os.getpid(), signal.SIGKILL)


def _hang(chosen: ActiveRehearsal, task: Any, request: Any) -> None:
    """Hang as a dependency that stops answering does: until the task's time limit
    interrupts (a soft limit raises here, a hard one kills the child), or until the
    rehearsal ends, after which the body runs as if the dependency came back."""
    logger.warning("%s[%s]: rehearsal %s: hanging", task.name, request.id, chosen.id)
    while any(r.id == chosen.id for r in active()):
        time.sleep(0.2)


def _record(chosen: ActiveRehearsal, task_id: str, task_name: str) -> None:
    try:
        RehearsalInjection.objects.create(rehearsal_id=chosen.id, task_id=str(task_id)[:255],
                                          task_name=task_name[:255], fault=chosen.fault)
    except Exception:  # noqa: BLE001 - the report misses a row; the rehearsal goes on
        logger.exception("recovery: could not record rehearsal %s's injection into %s[%s]",
                         chosen.id, task_name, task_id)
    events.rehearsal_injected.send(rehearsal=str(chosen.id), task_name=task_name,
                                   fault=chosen.fault)


def injected_into(task_id: str) -> str:
    """The rehearsal that hit ``task_id`` last ("" if none): for letters parked by the
    worker's main process (a killed child), which never saw the run's header."""
    if not task_id:
        return ""
    try:
        found = (RehearsalInjection.objects.filter(task_id=task_id).order_by("-at")
                 .values_list("rehearsal_id", flat=True).first())
    except Exception:  # noqa: BLE001 - an untagged letter beats a lost one
        logger.exception("recovery: could not look up a rehearsal for %s", task_id)
        return ""
    return "" if found is None else str(found)
