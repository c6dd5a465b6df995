"""Sagas: a workflow of steps, each with an optional compensation, persisted and resumable.

Declare one where the workflow is started::

    place_order = Saga("place_order", steps=[
        Step(reserve_inventory, compensate=release_inventory),
        Step(charge_payment, compensate=refund_payment),
        Step(create_shipment),
    ])
    run = place_order.start(order_id=42, idempotency_key="order-42")   # the SagaRun row

How a run moves (every transition is one transaction holding the run's row lock):

1. ``start()`` writes the ``SagaRun`` (with a snapshot of the definition: a run keeps the
   steps it started with even after the code changes), one ``SagaStep`` row per step, and
   the intent to publish step 0 (``recovery.workflows.outbox``): the step is published if and only
   if the run exists. The same ``idempotency_key`` never starts a second run.
2. A step is a ``RecoveryTask`` called with one argument, the context (the start
   arguments merged with what earlier steps returned), under the task id
   ``saga-<run>-<index>-step`` and the header ``recovery_saga``. It retries under its own
   policy like any task.
3. It succeeds: ``RecoveryTask.on_success`` calls :func:`on_task_succeeded`. The step row
   goes running -> succeeded only if it is still running under that task id (a
   redelivered or duplicate completion finds it done and changes nothing), the returned
   object is merged into the context, and the next step is enqueued through the outbox in
   the same transaction. A worker killed anywhere in between loses nothing (the message is
   acknowledged only after this, so it is redelivered and the step runs again: step
   effects must be idempotent, see :func:`step_key`) and publishes nothing twice.
4. It is parked (failed for good after its retries): :func:`on_task_parked`. An optional
   step is marked skipped and the run goes on. A saga declared ``on_failure="hold"``
   waits, ``held``, for an operator to :func:`resume` or :func:`compensate` it. Otherwise
   the run is ``compensating``: the compensation of the last completed step that declares
   one is dispatched (``saga-<run>-<index>-compensation``, called with the context and
   ``idempotency_key="<run>:<index>"``), then, as each succeeds, the one before it. When
   none is left the run is ``compensated`` (``failed`` if nothing needed undoing).
5. A compensation parked for good leaves the data inconsistent: the run is
   ``needs_human`` and :func:`escalate` is called.
6. Operators (admin, ``manage.py saga``) resume a held or failed run from the failed step,
   compensate a run by hand, and the dead-letter "compensate" of a step's letter
   compensates its run (:func:`compensate_letter`). Each is a ``SagaEvent``.
7. A step (or compensation) still running past its ``timeout_seconds`` that no worker
   holds lost its message: the watchdog (``recovery.observe.watchdog``) dispatches it again under
   a new task id (:func:`redispatch`, a ``redispatched`` event), a few times, then
   escalates it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from celery import current_app, signals
from celery.exceptions import Reject
from celery.result import AsyncResult
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Exists, F, OuterRef
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from .. import conf, events
from ..core import headers as hdr
from ..core.errors import exception_path
from ..core.task_modules import import_task_modules
from ..store import deferred
from ..store.connections import discard_broken_connections
from . import outbox, saga_secrets
from ..store.models import DeadLetter, DeadLetterEvent, SagaEvent, SagaRun, SagaStep
from ..core.names import logger_for

__all__ = [
    "Saga",
    "apply_deferred_completion",
    "Step",
    "SagaError",
    "SagaDefinitionError",
    "ON_FAILURE",
    "step_key",
    "resume",
    "compensate",
    "compensate_letter",
    "saga_of_letter",
    "escalate",
    "reconcile",
    "redispatch",
    "step_timeout_seconds",
    "on_task_succeeded",
    "on_task_parked",
    "step_succeeded",
    "step_parked",
]

logger = logger_for(__name__)

#: what a run does when a (non-optional) step fails for good
ON_FAILURE = ("compensate", "hold")
#: the keyword argument a compensation receives its idempotency key in
IDEMPOTENCY_KWARG = "idempotency_key"

Run = SagaRun.Status
Role = SagaStep.Role
State = SagaStep.Status


class SagaError(Exception):
    """An operation on a run is not possible as things are; the message says why."""


class SagaDefinitionError(SagaError, ValueError):
    """A saga is declared wrongly (no steps, an unknown task, a bad option)."""


# -- declaration --------------------------------------------------------------------------


def _task_name(task: Any, what: str) -> str:
    if isinstance(task, str):
        if not task.strip():
            raise SagaDefinitionError(f"{what} is an empty task name")
        return task
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise SagaDefinitionError(f"{what} must be a task or a task name, not {task!r}")
    return name


@dataclass(frozen=True)
class Step:
    """One step: a task, and optionally the task that undoes it.

    Attributes:
        task: a RecoveryTask (or its registered name), called as ``task(context)``; it
            returns a JSON object merged into the context, or None.
        compensate: the task that undoes it, called as
            ``compensate(context, idempotency_key="<run>:<index>")``; None if nothing
            needs undoing (a read, a notification).
        optional: a permanent failure of this step is recorded and skipped, neither held
            nor compensated (an email, a loyalty-points update).
        timeout_seconds: how long after its dispatch the step (and its compensation) may
            stay running before the watchdog (``recovery.observe.watchdog``) dispatches it again,
            as if its message was lost; None means
            ``RECOVERY["WATCHDOG"]["SAGA_STEP_TIMEOUT_SECONDS"]``. Give a step that waits
            long in its queue, or retries for long, a longer one.
    """

    task: Any
    compensate: Any = None
    optional: bool = False
    timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.optional, bool):
            raise SagaDefinitionError(f"optional must be True or False, not {self.optional!r}")
        if self.task is None:
            raise SagaDefinitionError("a step needs a task")
        timeout = self.timeout_seconds
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise SagaDefinitionError(
                f"timeout_seconds must be a positive number of seconds or None, not {timeout!r}")

    def to_dict(self) -> dict[str, Any]:
        """The step as stored on each run (task names, not task objects). The timeout is
        stored only when set, so a saga that declares none keeps its version digest."""
        spec = {
            "task": _task_name(self.task, "a step's task"),
            "compensate": None if self.compensate is None
            else _task_name(self.compensate, "a step's compensation"),
            "optional": self.optional,
        }
        if self.timeout_seconds is not None:
            spec["timeout_seconds"] = float(self.timeout_seconds)
        return spec


@dataclass(frozen=True)
class Saga:
    """A named sequence of steps and what to do when one fails for good.

    Attributes:
        name: how runs are listed (``SagaRun.name``).
        steps: the steps, run one after the other.
        on_failure: ``"compensate"`` (default): undo the completed steps in reverse order;
            ``"hold"``: park the run for an operator to resume or compensate.
        version: an explicit version recorded on each run; by default a digest of the
            steps and options, so any change to them is a new version. Runs in flight
            keep the definition they started with either way.
        secret_keys: names of context (and step result) keys that are secret in this saga,
            besides ``RECOVERY["SECRET_KEYS"]``, matched the same way (case-insensitive,
            contained in the key). Masked wherever a run is shown or reported, and their
            values scrubbed from its errors (:mod:`recovery.workflows.saga_secrets`).
    """

    name: str
    steps: Sequence[Step] = field(default=())
    on_failure: str = "compensate"
    version: str | None = None
    secret_keys: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SagaDefinitionError("a saga needs a name")
        steps = tuple(self.steps or ())
        if not steps:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")
        for position, step in enumerate(steps):
            if not isinstance(step, Step):
                raise SagaDefinitionError(
                    f"step {position} of saga {self.name!r} must be a Step, not {step!r}")
        object.__setattr__(self, "steps", steps)
        if self.on_failure not in ON_FAILURE:
            raise SagaDefinitionError(
                f"on_failure must be one of {', '.join(ON_FAILURE)}, not {self.on_failure!r}")
        if self.version is not None and (not isinstance(self.version, str)
                                         or not 0 < len(self.version) <= 64):
            raise SagaDefinitionError("version must be a string of 1 to 64 characters")
        keys = (self.secret_keys,) if isinstance(self.secret_keys, str) else self.secret_keys
        keys = tuple(keys or ())
        if not all(isinstance(key, str) and key.strip() for key in keys):
            raise SagaDefinitionError(
                f"secret_keys of saga {self.name!r} must be non-empty strings, not {keys!r}")
        object.__setattr__(self, "secret_keys", keys)

    @cached_property
    def definition(self) -> dict[str, Any]:
        """The snapshot stored on each run. Task names are resolved here, lazily, so a
        saga can be declared at import time next to its tasks."""
        body = {"on_failure": self.on_failure, "steps": [step.to_dict() for step in self.steps]}
        if self.secret_keys:
            # Only when declared: a saga without them keeps its version digest.
            body["secret_keys"] = list(self.secret_keys)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
        return {"name": self.name, "version": self.version or digest, "digest": digest, **body}

    def validate(self, app: Any = None) -> None:
        """Check every step and compensation is a registered RecoveryTask.

        Only RecoveryTask announces its outcome (``task_succeeded``, ``task_parked``), which
        the saga listens to; a plain Celery task would leave the run waiting forever.

        Raises:
            SagaDefinitionError: naming the first task that is missing or not a RecoveryTask.
        """
        app = app or current_app
        for position, spec in enumerate(self.definition["steps"]):
            for name in filter(None, (spec["task"], spec["compensate"])):
                if name not in app.tasks:
                    import_task_modules(app)
                task = app.tasks.get(name)
                if task is None:
                    raise SagaDefinitionError(
                        f"step {position} of saga {self.name!r}: task {name!r} is not registered")
                if not getattr(task, "announces_outcome", False):
                    raise SagaDefinitionError(
                        f"step {position} of saga {self.name!r}: {name} must be a RecoveryTask "
                        f"(base=RecoveryTask), or its outcome never reaches the saga")

    def start(self, idempotency_key: str | None = None, **context: Any) -> SagaRun:
        """Start a run with ``context`` (JSON values); returns the persisted run.

        Inside ``transaction.atomic()`` the first step is published only if the caller's
        transaction commits. With an ``idempotency_key`` already used, the existing run is
        returned and nothing is started.

        Raises:
            SagaDefinitionError: the definition is invalid (see :meth:`validate`).
            SagaError: the context is not JSON, or the key belongs to another saga's run.
        """
        context = _json_object(context, "the start arguments")
        if not self.__dict__.get("_validated"):
            self.validate()
            object.__setattr__(self, "_validated", True)
        definition = self.definition
        with transaction.atomic():
            if idempotency_key is not None:
                existing = SagaRun.objects.filter(idempotency_key=idempotency_key).first()
                if existing is not None:
                    return self._same_saga(existing)
            try:
                with transaction.atomic():  # a savepoint: a concurrent start with the same key
                    run = SagaRun.objects.create(
                        name=self.name, version=definition["version"], definition=definition,
                        context=context, idempotency_key=idempotency_key,
                    )
            except IntegrityError:
                if idempotency_key is None:
                    raise
                return self._same_saga(SagaRun.objects.get(idempotency_key=idempotency_key))
            SagaStep.objects.bulk_create(
                SagaStep(run=run, index=position, role=Role.STEP, task_name=spec["task"])
                for position, spec in enumerate(definition["steps"])
            )
            _dispatch(run, 0, Role.STEP)
            run.save(update_fields=["current_step", "updated_at"])
        logger.info("saga %s run %s started (version %s)", self.name, run.pk, run.version)
        return run

    def _same_saga(self, run: SagaRun) -> SagaRun:
        if run.name != self.name:
            raise SagaError(f"idempotency key {run.idempotency_key!r} already started run "
                            f"{run.pk} of saga {run.name!r}, not {self.name!r}")
        return run


def _json_object(value: Any, what: str) -> dict:
    try:
        data = json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise SagaError(f"{what} must be JSON-serialisable: {exc}") from None
    if not isinstance(data, dict):
        raise SagaError(f"{what} must be a JSON object, not {type(value).__name__}")
    return data


def step_key(request: Any) -> str | None:
    """The idempotency key of the saga step (or compensation) a task is running:
    ``"<run id>:<step index>"`` for a step, ``"<run id>:<step index>:compensation"`` for
    its compensation (distinct, so an API with account-wide keys never mistakes a refund
    for the charge it undoes); the same on every retry, redelivery and resume. A step
    records its effect under it, so running again never repeats the effect.

    Pass ``self.request`` (or the bound task itself). None outside a saga.
    """
    ref = _Ref.parse(hdr.read(getattr(request, "request", request), hdr.SAGA))
    return None if ref is None else _key(ref.run, ref.step, ref.role)


def _key(run_id: int, index: int, role: str) -> str:
    return f"{run_id}:{index}" if role == Role.STEP else f"{run_id}:{index}:{role}"


# -- the message header -----------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    run: int
    step: int
    role: str

    @classmethod
    def parse(cls, header: Any) -> _Ref | None:
        if not isinstance(header, Mapping):
            return None
        try:
            ref = cls(int(header["run"]), int(header["step"]), str(header.get("role", Role.STEP)))
        except (KeyError, TypeError, ValueError):
            return None
        return ref if ref.role in Role.values else None

    def header(self) -> dict[str, Any]:
        return {hdr.SAGA: {"run": self.run, "step": self.step, "role": self.role}}


def _task_id(run_id: int, index: int, role: str, dispatch: int) -> str:
    base = f"saga-{run_id}-{index}-{role}"
    return base if dispatch <= 1 else f"{base}.{dispatch}"


# -- moving a run (callers hold the run's row lock, inside a transaction) -----------------


def _lock(run: SagaRun | int) -> SagaRun:
    pk = run.pk if isinstance(run, SagaRun) else run
    try:
        return SagaRun.objects.select_for_update().get(pk=pk)
    except SagaRun.DoesNotExist:
        raise SagaError(f"no saga run with id {pk}") from None


def _dispatch(run: SagaRun, index: int, role: str) -> str:
    """Mark the step (or its compensation) running under a fresh deterministic task id and
    enqueue it through the outbox, in the caller's transaction. Returns the task id."""
    spec = run.definition["steps"][index]
    task_name = spec["task"] if role == Role.STEP else spec["compensate"]
    row, _ = SagaStep.objects.get_or_create(run=run, index=index, role=role,
                                            defaults={"task_name": task_name})
    dispatch = row.dispatches + 1
    task_id = _task_id(run.pk, index, role, dispatch)
    SagaStep.objects.filter(pk=row.pk).update(
        status=State.RUNNING, task_name=task_name, task_id=task_id, dispatches=dispatch,
        dispatched_at=timezone.now(), started_at=None, finished_at=None, error="", result=None,
    )
    kwargs = {IDEMPOTENCY_KWARG: _key(run.pk, index, role)} if role == Role.COMPENSATION else {}
    headers = _Ref(run.pk, index, role).header()
    if saga_secrets.secret_keys(run):  # its letter is masked by them too (see redaction)
        headers[hdr.SAGA]["secret_keys"] = list(saga_secrets.secret_keys(run))
    outbox.enqueue(task_name, [run.context], kwargs, task_id=task_id, headers=headers)
    run.current_step = index
    return task_id


def step_timeout_seconds(definition: Mapping[str, Any], index: int) -> float | None:
    """The ``timeout_seconds`` a run's snapshot gives step ``index`` (None: not set, or a
    snapshot written before steps had one)."""
    try:
        value = definition["steps"][index].get("timeout_seconds")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def redispatch(step: SagaStep | int, *, task_id: str, dispatched_before: Any = None,
               actor: str = "watchdog", note: str = "") -> str | None:
    """Dispatch a running step (or compensation) again under a new task id, because its
    message was lost: the run's outbox intent was published, but no worker ever ran it
    to the end (a broker that lost it, a queue nobody consumes).

    Like :func:`resume`, the new dispatch (``....<role>.<n>``) goes through the outbox in
    the same transaction, under the run's lock, and the message of the old task id is
    stale from then on (:func:`is_current` drops it), so at most one of the two advances
    the run. The step must be idempotent, as every step must (its key stays the same).

    Only acts if the row is still running under ``task_id`` (and was dispatched before
    ``dispatched_before``, when given) in a running or compensating run; returns the new
    task id, or None when the step moved on in the meantime. Records a ``redispatched``
    ``SagaEvent``.
    """
    pk = step.pk if isinstance(step, SagaStep) else step
    with transaction.atomic():
        run_id = SagaStep.objects.filter(pk=pk).values_list("run_id", flat=True).first()
        if run_id is None:
            return None
        run = _lock(run_id)
        row = SagaStep.objects.filter(pk=pk).first()
        if (row is None or row.status != State.RUNNING or row.task_id != task_id
                or run.status not in (Run.RUNNING, Run.COMPENSATING)
                or (dispatched_before is not None and row.dispatched_at is not None
                    and row.dispatched_at >= dispatched_before)):
            return None
        new_id = _dispatch(run, row.index, row.role)
        run.save(update_fields=["current_step", "updated_at"])
        outcome = (f"{row.role} {row.index} ({row.task_name}) dispatched again as {new_id}: "
                   f"{task_id} never finished")
        SagaEvent.objects.create(run=run, action=SagaEvent.Action.REDISPATCHED, actor=actor,
                                 note=note, outcome=outcome[:255])
    logger.warning("saga %s run %s: %s", run.name, run.pk, outcome)
    return new_id


def _finish(run: SagaRun, status: str) -> None:
    run.status = status
    run.finished_at = timezone.now()
    run.save()
    logger.info("saga %s run %s %s", run.name, run.pk, status)


def _next_step(run: SagaRun, after: int) -> None:
    if after + 1 < len(run.definition["steps"]):
        _dispatch(run, after + 1, Role.STEP)
        run.save()
    else:
        _finish(run, Run.SUCCEEDED)


def _compensable(run: SagaRun) -> list[SagaStep]:
    """Completed steps that declare a compensation, last first."""
    specs = run.definition["steps"]
    return [row for row in run.steps.filter(role=Role.STEP, status=State.SUCCEEDED)
            .order_by("-index") if specs[row.index]["compensate"]]


def _next_compensation(run: SagaRun) -> None:
    """Dispatch the compensation of the last completed step that has one; or end the
    run: compensated, or failed when nothing had to be undone."""
    pending = _compensable(run)
    if pending:
        _dispatch(run, pending[0].index, Role.COMPENSATION)
        run.status = Run.COMPENSATING
        run.save()
        return
    undone = run.steps.filter(role=Role.STEP, status=State.COMPENSATED).exists()
    _finish(run, Run.COMPENSATED if undone else Run.FAILED)


def _error_text(exc: BaseException) -> str:
    return f"{exception_path(exc)}: {exc}"[: int(conf.get("MESSAGE_MAX_CHARS"))]


#: run statuses in which a *failed* row's task id may still report success: its dead letter
#: was replayed from the DLQ (recovery.operations.replay) and the replay succeeded
#: pause before requeueing a step whose completion the database could not record
_REQUEUE_PAUSE_SECONDS = 2.0

_REOPENABLE = {Role.STEP: (Run.HELD, Run.FAILED), Role.COMPENSATION: (Run.NEEDS_HUMAN,)}


def _succeeded(ref: _Ref, task_id: str, retval: Any) -> None:
    run = SagaRun.objects.select_for_update().filter(pk=ref.run).first()
    if run is None:
        logger.error("saga run %s of %s does not exist; ignoring its completion", ref.run, task_id)
        return
    row = run.steps.filter(index=ref.step, role=ref.role).first()
    if row is None or row.task_id != task_id:
        logger.info("saga run %s: %s is not the current task of step %s (%s); ignored",
                    run.pk, task_id, ref.step, ref.role)
        return
    if row.status != State.RUNNING and not (row.status == State.FAILED
                                            and run.status in _REOPENABLE[ref.role]):
        logger.info("saga run %s: %s completed again (step %s is %s); nothing to do",
                    run.pk, task_id, ref.step, row.status)
        return
    result = json.loads(json.dumps(retval, default=str))
    SagaStep.objects.filter(pk=row.pk).update(status=State.SUCCEEDED, finished_at=timezone.now(),
                                              result=result, error="")
    if ref.role == Role.STEP:
        if isinstance(result, dict):
            run.context = {**run.context, **result}
        elif result is not None:
            logger.warning("saga run %s: step %s (%s) returned %s, not a JSON object; kept on the "
                           "step, not merged into the context", run.pk, ref.step, row.task_name,
                           type(retval).__name__)
        if run.status in _REOPENABLE[Role.STEP]:  # its replayed letter succeeded
            run.status, run.error, run.finished_at = Run.RUNNING, "", None
        if run.status == Run.RUNNING:
            _next_step(run, ref.step)
        else:
            run.save()
        return
    SagaStep.objects.filter(run=run, index=ref.step, role=Role.STEP).update(
        status=State.COMPENSATED)
    events.compensation_finished.send_on_commit(outcome="succeeded")
    if run.status == Run.NEEDS_HUMAN:  # its replayed letter succeeded
        run.status, run.finished_at = Run.COMPENSATING, None
    if run.status == Run.COMPENSATING:
        _next_compensation(run)


def _parked(ref: _Ref, task_id: str, error: str) -> str | None:
    """Returns the reason to escalate, if any."""
    run = SagaRun.objects.select_for_update().filter(pk=ref.run).first()
    if run is None:
        return None
    row = run.steps.filter(index=ref.step, role=ref.role).first()
    if row is None or row.task_id != task_id or row.status != State.RUNNING:
        logger.info("saga run %s: parked %s is not a running step; ignored", ref.run, task_id)
        return None
    spec = run.definition["steps"][ref.step]
    now = timezone.now()
    # The run's error, the step's, the log lines and any escalation never quote a secret
    # the run carries; the step's dead letter keeps the real text.
    error = saga_secrets.scrub(error, saga_secrets.hidden(run, _results(run)))
    if ref.role == Role.COMPENSATION:
        SagaStep.objects.filter(pk=row.pk).update(status=State.FAILED, finished_at=now,
                                                  error=error)
        run.status = Run.NEEDS_HUMAN
        run.error = (f"compensation {row.task_name} of step {ref.step} failed for good and was "
                     f"parked as dead letter {task_id}: {error}")
        run.save()
        events.compensation_finished.send_on_commit(outcome="failed")
        return run.error
    optional = spec.get("optional")
    SagaStep.objects.filter(pk=row.pk).update(
        status=State.SKIPPED if optional else State.FAILED, finished_at=now, error=error)
    if optional:
        logger.warning("saga run %s: optional step %s (%s) failed for good; skipped", run.pk,
                       ref.step, row.task_name)
        if run.status == Run.RUNNING:
            _next_step(run, ref.step)
        return None
    run.error = f"step {ref.step} ({row.task_name}) failed for good: {error}"
    if run.definition.get("on_failure") == "hold":
        run.status = Run.HELD
        run.save()
        logger.warning("saga %s run %s held: %s. Resume it once the cause is fixed "
                       "(manage.py saga resume %s), or compensate it", run.name, run.pk,
                       run.error, run.pk)
        return None
    logger.warning("saga %s run %s compensating: %s", run.name, run.pk, run.error)
    _next_compensation(run)
    if run.status != Run.FAILED:
        # Undone by the saga: nobody should replay this step of a compensated run later.
        _close_letter(task_id, DeadLetter.Status.COMPENSATED, DeadLetterEvent.Action.COMPENSATED,
                      actor="system", note="",
                      outcome=f"saga {run.name} run {run.pk} compensates its completed steps")
    return None


# -- what a RecoveryTask's outcome means for its saga (recovery.subscriptions connects them) ---------------------------------------------------------


def is_current(saga: Any, task_id: str, *, replay: bool = False) -> bool:
    """Should a saga task's message run? Not when it is stale: its step was dispatched
    again under another id, or it is no longer running because the run moved on (e.g. the
    step was parked and the run is compensating, and the message came back after a lost
    ack). A replay of a failed step of a held or failed run (from its dead letter) runs.

    Unreadable database: True. Steps are idempotent; a stale run is better than a lost one.
    """
    ref = _Ref.parse(saga)
    if ref is None:
        return True
    try:
        row = (SagaStep.objects.filter(run_id=ref.run, index=ref.step, role=ref.role)
               .values("task_id", "status", "run__status").first())
    except DatabaseError as exc:
        logger.warning("saga run %s: cannot check whether %s is current (%s); running it",
                       ref.run, task_id, exc)
        return True
    if row is None or row["task_id"] != task_id:
        return False
    if row["status"] == State.RUNNING:
        return True
    return replay and row["status"] == State.FAILED and row["run__status"] in _REOPENABLE[ref.role]



def step_succeeded(task_id: str, retval: Any, request: Any, **_: Any) -> None:
    """On ``task_succeeded``: if the task is a saga's step or compensation, record it."""
    saga = hdr.read(request, hdr.SAGA)
    if saga:
        on_task_succeeded(saga, retval, task_id)


def step_parked(task_id: str, request: Any, exc: BaseException, **_: Any) -> None:
    """On ``task_parked``: if the task is a saga's step or compensation, act on it."""
    saga = hdr.read(request, hdr.SAGA)
    if saga:
        on_task_parked(saga, task_id, exc)


def on_task_succeeded(saga: Any, retval: Any, task_id: str) -> None:
    """A step or compensation succeeded: record it and dispatch what comes next.

    ``saga`` is the task's saga header. After ``RecoveryTask.on_success`` has stored the
    result (through :func:`step_succeeded`). The step's body has
    run, so its completion must never be lost nor cost a second run: if the database
    refuses (after one retry on a fresh connection), the completion is spooled as a
    deferred write (:mod:`recovery.store.deferred`) and the spool drain records it, and
    dispatches the next step, once the database is back. Only if the spool refuses too is
    the message requeued (``Reject``), so the step runs again (idempotently).
    """
    try:
        error = deferred.write_or_defer(
            deferred.SAGA_SUCCEEDED, lambda: record_completion(saga, task_id, retval),
            saga=saga, task_id=task_id, retval=json.loads(json.dumps(retval, default=str)))
        if error is not None:
            logger.error("saga run %s: could not record the completion of %s (%s); spooled, "
                         "the run advances when the database is back", _run_of(saga), task_id,
                         error)
        return
    except OSError as spool_exc:
        error = spool_exc.__cause__
        logger.critical("saga run %s: could not record the completion of %s (database: %s; "
                        "spool: %s); requeueing it in %.0fs", _run_of(saga), task_id, error,
                        spool_exc, _REQUEUE_PAUSE_SECONDS)
    # Requeued messages come straight back: pause so an outage does not turn the step
    # (idempotent, but maybe an external call) into a tight loop.
    time.sleep(_REQUEUE_PAUSE_SECONDS)
    raise Reject(error, requeue=True) from error


def _run_of(saga: Any) -> Any:
    ref = _Ref.parse(saga)
    return ref.run if ref is not None else saga


def apply_deferred_completion(data: dict, backend: Any) -> None:
    """Apply a spooled ``saga_succeeded`` record (:mod:`recovery.store.deferred`);
    registered by :mod:`recovery.subscriptions`."""
    record_completion(data["saga"], data["task_id"], data.get("retval"))



def record_completion(saga: Any, task_id: str, retval: Any) -> None:
    """Record that the step or compensation ``task_id`` of ``saga`` (its header value)
    succeeded, and dispatch what comes next. Idempotent: a completion already recorded,
    or of a task that is no longer the step's current one, changes nothing.

    Raises:
        django.db.DatabaseError: the database refused; nothing was recorded.
    """
    ref = _Ref.parse(saga)
    if ref is None:
        logger.error("task %s has an unreadable %s header %r; the saga is not advanced",
                     task_id, hdr.SAGA, saga)
        return
    with transaction.atomic():
        _succeeded(ref, task_id, retval)


def on_task_parked(saga: Any, task_id: str, exc: BaseException) -> None:
    """A step or compensation was parked as a dead letter: skip, hold, compensate, or mark
    the run for a human. Never raises: the letter is already safe, and :func:`reconcile`
    picks up a run whose failure could not be recorded (database down)."""
    ref = _Ref.parse(saga)
    if ref is None:
        logger.error("task %s has an unreadable %s header %r", task_id, hdr.SAGA, saga)
        return
    _record_parked(ref, task_id, _error_text(exc))


def _record_parked(ref: _Ref, task_id: str, error: str) -> None:
    try:
        with transaction.atomic():
            reason = _parked(ref, task_id, error)
            if reason:
                run = SagaRun.objects.get(pk=ref.run)
                transaction.on_commit(lambda: escalate(run, reason), robust=True)
    except DatabaseError as exc:
        discard_broken_connections()
        logger.error("saga run %s: could not record that %s was parked (%s); the run waits "
                     "until `manage.py saga reconcile` (see docs/sagas.md)", ref.run, task_id, exc)
    except Exception:  # noqa: BLE001 - parking must never be undone by the saga
        logger.exception("saga run %s: recording that %s was parked failed", ref.run, task_id)


@signals.task_prerun.connect(weak=False, dispatch_uid="recovery-saga-step-started")
def _step_started(sender: Any = None, task_id: str | None = None, task: Any = None,
                  **kwargs: Any) -> None:
    """Timings: count each start of a saga task and note the first of this dispatch."""
    request = getattr(task, "request", None)
    ref = _Ref.parse(hdr.read(request, hdr.SAGA)) if request is not None else None
    if ref is None or getattr(request, "is_eager", False):
        return
    try:
        SagaStep.objects.filter(run_id=ref.run, index=ref.step, role=ref.role, task_id=task_id,
                                status=State.RUNNING).update(
            attempts=F("attempts") + 1, started_at=Coalesce(F("started_at"), Now()))
    except DatabaseError as exc:  # bookkeeping only; the step runs anyway
        logger.info("saga run %s: start of %s not recorded (%s)", ref.run, task_id, exc)


# -- escalation -----------------------------------------------------------------------------


def escalate(run: SagaRun, reason: str) -> None:
    """A run needs a human: a compensation failed for good, so data may be inconsistent.

    The one place escalation happens for sagas: a CRITICAL log line, an ``escalated``
    event on the run, and (``RECOVERY["ESCALATION"]["ON_COMPENSATION_FAILURE"]``) an
    incident per saga, linked to the run (``saga_needs_human``, which
    :mod:`recovery.observe.escalation` listens to).
    """
    failed = SagaStep.objects.filter(run_id=run.pk, status=SagaStep.Status.FAILED).order_by(
        "-finished_at", "-id").first()
    values = saga_secrets.hidden(run, _results(run))
    reason = saga_secrets.scrub(reason, values)
    logger.critical("saga %s run %s NEEDS A HUMAN: %s. Data may be inconsistent: fix the "
                    "cause, then `manage.py saga compensate %s` (runbook: "
                    "docs/runbooks/saga-compensation-failed.md)", run.name, run.pk, reason, run.pk)
    try:
        SagaEvent.objects.create(run_id=run.pk, action=SagaEvent.Action.ESCALATED,
                                 actor="system", outcome=reason[:255])
    except DatabaseError:
        logger.exception("saga run %s: could not record the escalation", run.pk)
    events.saga_needs_human.send(run=run, reason=reason, failed_step=failed, hidden=values)


def _results(run: SagaRun) -> list:
    """What the run's steps returned (their secrets are scrubbed from its errors too)."""
    return list(SagaStep.objects.filter(run_id=run.pk, result__isnull=False)
                .values_list("result", flat=True))


# -- operator operations (admin and manage.py saga) -----------------------------------------


def _failed_row(run: SagaRun, role: str) -> SagaStep:
    row = run.steps.filter(role=role, status=State.FAILED).order_by("-index").first()
    if row is None:
        raise SagaError(f"run {run.pk} has no failed {role}")
    if DeadLetter.objects.filter(task_id=row.task_id, status=DeadLetter.Status.REPLAYING).exists():
        raise SagaError(f"the dead letter of {row.task_id} is being replayed; wait until the "
                        f"replay ends")
    return row


def _close_letter(task_id: str, status: str, action: str, *, actor: str, note: str,
                  outcome: str, keep: int | None = None) -> None:
    """Close the parked letter a superseded step left, so nobody replays it later.

    ``keep``: a letter the caller closes itself (the dead-letter compensate of it)."""
    letter = (DeadLetter.objects.select_for_update(skip_locked=True)
              .filter(task_id=task_id, status=DeadLetter.Status.PARKED)
              .exclude(pk=keep).first())
    if letter is not None:
        letter.status = status
        letter.save(update_fields=["status", "updated_at"])
        DeadLetterEvent.objects.create(letter=letter, action=action, actor=actor, note=note,
                                       outcome=outcome[:255])


def resume(run: SagaRun | int, *, actor: str = "system", note: str = "") -> SagaRun:
    """Run a held (or failed) run again from its failed step, once its cause is fixed.

    The step is dispatched under a new task id (``....step.<n>``) with a fresh attempt
    budget and the current context; its old dead letter is closed as resolved.

    Raises:
        SagaError: the run is not held or failed, or the step's letter is being replayed.
    """
    with transaction.atomic():
        run = _lock(run)
        if run.status not in (Run.HELD, Run.FAILED):
            raise SagaError(f"run {run.pk} is {run.status}; only held or failed runs can be "
                            f"resumed")
        row = _failed_row(run, Role.STEP)
        _close_letter(row.task_id, DeadLetter.Status.RESOLVED, DeadLetterEvent.Action.RESOLVED,
                      actor=actor, note=note,
                      outcome=f"superseded: saga run {run.pk} resumed from step {row.index}")
        run.status, run.error, run.finished_at = Run.RUNNING, "", None
        task_id = _dispatch(run, row.index, Role.STEP)
        run.save()
        outcome = f"step {row.index} ({row.task_name}) dispatched again as {task_id}"
        SagaEvent.objects.create(run=run, action=SagaEvent.Action.RESUMED, actor=actor,
                                 note=note, outcome=outcome[:255])
    logger.warning("saga %s run %s resumed by %s: %s", run.name, run.pk, actor, outcome)
    return run


def _compensate_locked(run: SagaRun, *, actor: str, note: str, letter_pk: int | None) -> str:
    """With the run locked: start (or restart) its compensation. Returns the outcome."""
    if run.status == Run.HELD:
        row = _failed_row(run, Role.STEP)
        _close_letter(row.task_id, DeadLetter.Status.COMPENSATED,
                      DeadLetterEvent.Action.COMPENSATED, actor=actor, note=note,
                      outcome=f"saga run {run.pk} compensated", keep=letter_pk)
        _next_compensation(run)
        if run.status == Run.FAILED:
            return "nothing to undo: the run is failed"
        return f"compensating from step {run.current_step}"
    if run.status == Run.NEEDS_HUMAN:
        row = _failed_row(run, Role.COMPENSATION)
        task_id = _dispatch(run, row.index, Role.COMPENSATION)
        _close_letter(row.task_id, DeadLetter.Status.RESOLVED, DeadLetterEvent.Action.RESOLVED,
                      actor=actor, note=note,
                      outcome=f"superseded: saga run {run.pk} compensation dispatched again "
                              f"as {task_id}", keep=letter_pk)
        run.status, run.finished_at = Run.COMPENSATING, None
        run.save()
        return f"compensation of step {row.index} ({row.task_name}) dispatched again as {task_id}"
    if run.status == Run.SUCCEEDED:
        if not _compensable(run):
            raise SagaError(f"run {run.pk} has nothing to compensate: no completed step "
                            f"declares a compensation")
        _next_compensation(run)
        return f"compensating a succeeded run from step {run.current_step}"
    raise SagaError(f"run {run.pk} is {run.status}; only held, needs-human or succeeded runs "
                    f"can be compensated")


def compensate(run: SagaRun | int, *, actor: str = "system", note: str = "") -> SagaRun:
    """Undo a run by hand: its completed steps' compensations, in reverse order.

    - ``held``: the failed step's letter is closed as compensated and the compensations
      start (nothing to undo: the run ends ``failed``);
    - ``needs_human``: the compensation that failed for good is dispatched again (a new
      task id, ``....compensation.<n>``, the same idempotency key) once its cause is
      fixed, and the rest follow;
    - ``succeeded``: undo a finished run.

    Raises:
        SagaError: the run is running, compensating, compensated or failed, or a letter
            of it is being replayed.
    """
    with transaction.atomic():
        run = _lock(run)
        outcome = _compensate_locked(run, actor=actor, note=note, letter_pk=None)
        SagaEvent.objects.create(run=run, action=SagaEvent.Action.COMPENSATED, actor=actor,
                                 note=note, outcome=outcome[:255])
    logger.warning("saga %s run %s compensation started by %s: %s", run.name, run.pk, actor,
                   outcome)
    return run


def saga_of_letter(letter: DeadLetter) -> dict | None:
    """The ``recovery_saga`` header a dead letter's task carried, or None."""
    header = hdr.from_options(letter.headers, hdr.SAGA)
    return header if _Ref.parse(header) is not None else None


def compensate_letter(letter: DeadLetter, *, actor: str = "system", note: str = "") -> str:
    """The dead-letter "compensate" of a saga step's (or compensation's) letter: compensate
    the run it belongs to, and close the letter as compensated. Call it in a transaction,
    with the letter locked and parked (``recovery.operations.replay.compensate`` does). Returns the
    outcome recorded on the letter's event.

    Raises:
        SagaError: the run is running (wait for it, or compensate it from the saga admin
            once it stops), or cannot be compensated as it is.
    """
    ref = _Ref.parse(saga_of_letter(letter))
    if ref is None:
        raise SagaError(f"letter {letter.pk} does not belong to a saga")
    run = _lock(ref.run)
    row = run.steps.filter(index=ref.step, role=ref.role).first()
    if run.status in (Run.COMPENSATING, Run.COMPENSATED, Run.FAILED):
        outcome = f"saga {run.name} run {run.pk} is already {run.status}"
    elif row is None or row.task_id != letter.task_id or row.status != State.FAILED:
        # An optional step's letter, or a superseded attempt's: not why the run stopped.
        raise SagaError(
            f"letter {letter.pk} is not the failure saga {run.name} run {run.pk} stopped at "
            f"(the run is {run.status}); resolve or discard the letter, and compensate the run "
            f"itself (manage.py saga compensate {run.pk}) if it must be undone")
    else:
        outcome = _compensate_locked(run, actor=actor, note=note, letter_pk=letter.pk)
        SagaEvent.objects.create(run=run, action=SagaEvent.Action.COMPENSATED, actor=actor,
                                 note=note,
                                 outcome=f"from dead letter {letter.pk}: {outcome}"[:255])
        outcome = f"saga {run.name} run {run.pk}: {outcome}"
    letter.status = DeadLetter.Status.COMPENSATED
    letter.save(update_fields=["status", "updated_at"])
    DeadLetterEvent.objects.create(letter=letter, action=DeadLetterEvent.Action.COMPENSATED,
                                   actor=actor, note=note, outcome=outcome[:255])
    return outcome


def reconcile(*, older_than_seconds: float = 60.0, check_results: bool = True,
              limit: int = 500, app: Any = None) -> int:
    """Record step outcomes the hooks missed; returns how many steps it settled.

    A step parked while the database was down (spooled, drained later), or parked by the
    worker's main process (poison: past ``MAX_DELIVERIES``), never told its run: a running
    step with a *parked* letter under its task id is handled as :func:`on_task_parked` would. Every worker does this (one indexed
    query per tick, ``recovery.delivery.worker.Housekeeping``). With ``check_results`` (``manage.py
    saga reconcile``), a step whose result is ``SUCCESS`` in the result backend is handled
    as :func:`on_task_succeeded` would (a success whose hook failed is normally requeued
    and recorded on its next run; this is for a result backend that outlived the message).

    Only steps dispatched more than ``older_than_seconds`` ago are looked at. Safe to run
    any time, by any number of processes: the transitions are the same conditional ones.
    """
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    running = SagaStep.objects.filter(status=State.RUNNING, dispatched_at__lt=cutoff)
    parked = DeadLetter.objects.filter(task_id=OuterRef("task_id"),
                                       status=DeadLetter.Status.PARKED)
    settled = 0
    for row in running.filter(Exists(parked)).order_by("dispatched_at")[:limit]:
        letter = DeadLetter.objects.filter(task_id=row.task_id).first()
        if letter is None:
            continue
        logger.warning("saga run %s: %s was parked but the run was not told; recording it now",
                       row.run_id, row.task_id)
        _record_parked(_Ref(row.run_id, row.index, row.role), row.task_id,
                       f"{letter.exception_type}: {letter.exception_message}"
                       [: int(conf.get("MESSAGE_MAX_CHARS"))])
        settled += 1
    if not check_results:
        return settled
    app = app or current_app
    for row in running.exclude(Exists(parked)).order_by("dispatched_at")[:limit]:
        result = AsyncResult(row.task_id, app=app)
        try:
            if result.state != "SUCCESS":
                continue
            value = result.result
        except Exception:  # noqa: BLE001 - no result backend, or it is unreachable
            continue
        try:
            on_task_succeeded(_Ref(row.run_id, row.index, row.role).header()[hdr.SAGA], value,
                              row.task_id)
        except Reject:
            continue
        settled += 1
    return settled
