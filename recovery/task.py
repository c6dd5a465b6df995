"""RecoveryTask: a Celery task that retries what can heal and parks what cannot.

The lifecycle of a failing task:

1. The task raises. :meth:`RecoveryTask.__call__` hands the exception to the
   classifier (project rules first, then the built-in ones): a ``Failure``
   comes back with a scenario kind, transient or permanent, and an optional
   retry-after. ``self.retry()`` and ``autoretry_for`` land here too, so no
   Celery retry path can bypass the policy (Celery's ``max_retries`` is
   unused: ``max_attempts`` governs).
2. The task's ``RetryPolicy`` (per-call header > task attribute >
   ``RECOVERY["DEFAULT_POLICY"]`` > library default) turns the failure and the
   attempt history carried in the message into a verdict: retry after N
   seconds, or park.
3. Retry: the task is republished under the same id with the delay and the
   history in its headers. Delays longer than
   ``RECOVERY["BROKER_DELAY_MAX_SECONDS"]`` wait in the database due-table and
   are published by the workers when due, so no worker holds them past the
   broker's visibility timeout.
4. Park: one ``DeadLetter`` row per task id (an upsert), written with the
   FAILURE result in one transaction, or spooled to local disk when the
   database is down. The exception is then re-raised so Celery records the
   failure, fires errbacks and signals; the message is acknowledged only
   after all of this (``acks_late``).
5. What the child process cannot do (it was killed, or hit the hard time
   limit) happens in the worker's main process: see :mod:`recovery.delivery.worker`.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import sys
import time
import traceback as traceback_module
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ContextManager

from celery import Task, states
from celery.exceptions import Ignore, Reject, Retry
from django.db import DatabaseError, InterfaceError
from kombu.exceptions import EncodeError
from django.utils import timezone
from django.utils.module_loading import import_string

from . import conf, events
from .core import headers as hdr, redaction
from .core.bounds import cut, delay_seconds
from .core.classification import Failure, Rule, classify
from .core.brokers import (broker_delay, delivered_queue, delivered_route, queue_delivered_from,
                           uses_native_delayed_delivery)

#: Options by which a caller of ``self.retry`` chose where the next run goes.
ROUTE_OPTIONS = ("queue", "exchange", "routing_key")
from .core.errors import DependencyError, TransientError, exception_path
from .core.policy import Attempt, RetryPolicy, Verdict, default_policy
from .store import deferred, effects, result_rows
from .store.connections import discard_broken_connections
from .store.due import hold
from .store.models import FallbackUse
from .store.parking import ParkRecord, park
from .workflows import broker_waits, degraded, rehearsals
from .workflows.circuit import Circuit, CircuitOpenError
from .workflows.sagas import is_current, step_key

__all__ = ["RecoveryTask", "exception_path"]

logger = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _FallbackOutcome:
    """The value a fallback returned (which may be None), standing as the task's result."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _accepts(target: Any, name: str) -> bool:
    func = getattr(target, "run", target)
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class _RetryRequested(Exception):
    """Raised by RecoveryTask.retry() so the request flows through the policy."""

    def __init__(self, exc: BaseException | None, min_delay: float | None,
                 args: Any, kwargs: Any, options: dict) -> None:
        super().__init__("retry requested")
        self.exc = exc
        self.min_delay = min_delay
        self.call_args = args
        self.call_kwargs = kwargs
        self.options = options


class _ParkAwareBackend:
    """The task's result backend, minus writes recovery makes redundant.

    Parking stores the FAILURE result in the same transaction as the letter; Celery
    then calls ``mark_as_failure`` as usual (errbacks, chords, signals) and this
    wrapper only skips its store, so the result is written once. The intermediate
    RETRY state is not stored unless ``RECOVERY["STORE_RETRY_STATE"]``: the attempt
    history travels with the message and lands on the letter, and a RETRY row costs a
    database transaction per retry, as much as a small task itself.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def mark_as_done(self, task_id, result, request=None, store_result=True,
                     state=states.SUCCESS):
        """Store the SUCCESS result; never turn a returned task into a failure.

        The body has run when this is called: a result store that fails (the database
        restarted, or is down) is retried once on a fresh connection, then spooled as a
        deferred write (:mod:`recovery.store.deferred`) that the spool drain stores later.
        """
        return _bookkeeping_write(
            task_id, result, request,
            lambda: self._backend.mark_as_done(task_id, result, request=request,
                                               store_result=store_result, state=state),
            self._backend)

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        def write():
            return self._backend.store_result(task_id, result, state, traceback=traceback,
                                              request=request, **kwargs)

        if state != states.SUCCESS:
            return write()
        return _bookkeeping_write(task_id, result, request, write, self._backend)

    def mark_as_retry(self, task_id, exc, traceback=None, request=None, **kwargs):
        if not conf.get("STORE_RETRY_STATE"):
            return None
        values = result_rows.hidden_in_request(request)
        if values == [] or not kwargs.get("store_result", True):
            return self._backend.mark_as_retry(task_id, exc, traceback=traceback,
                                               request=request, **kwargs)
        shown_exc, shown_traceback = result_rows.scrubbed_failure(
            self._backend, exc, traceback, values)
        return self._backend.store_result(task_id, shown_exc, kwargs.get("state", states.RETRY),
                                          traceback=shown_traceback, request=request)

    def mark_as_failure(self, task_id, exc, traceback=None, request=None,
                        store_result=True, call_errbacks=True, state=None, **kwargs):
        """Celery's ``mark_as_failure`` (chords, chains, errbacks see the real exception);
        the row it stores has the task's secrets scrubbed from the exception and traceback."""
        if request is not None and getattr(request, "_recovery_result_stored", False):
            store_result = False
        values = result_rows.hidden_in_request(request) if store_result else []
        if values != []:
            shown_exc, shown_traceback = result_rows.scrubbed_failure(
                self._backend, exc, traceback, values)
            self._backend.store_result(task_id, shown_exc, state or states.FAILURE,
                                       traceback=shown_traceback, request=request)
            store_result = False
        if state is not None:
            kwargs["state"] = state
        return self._backend.mark_as_failure(
            task_id, exc, traceback=traceback, request=request,
            store_result=store_result, call_errbacks=call_errbacks, **kwargs,
        )


def _bookkeeping_write(task_id: str, result: Any, request: Any, write, backend: Any) -> Any:
    """Run ``write`` (a SUCCESS result store); retry it once on a fresh connection, then
    spool it. A result that cannot be serialized (``EncodeError``) is the task's own
    problem and propagates: Celery records it as the task's FAILURE."""
    try:
        return write()
    except DatabaseError:
        # A connection the database broke (restart, failover) fails once; a fresh one
        # may work.
        discard_broken_connections()
    except EncodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other store failure is ours, not the task's
        return _defer_success(task_id, result, request, backend, exc)
    try:
        return write()
    except EncodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, DatabaseError):
            discard_broken_connections()
        return _defer_success(task_id, result, request, backend, exc)


def _defer_success(task_id: str, result: Any, request: Any, backend: Any,
                   error: BaseException) -> None:
    try:
        deferred.defer_result(backend, task_id, result, request)
    except Exception as spool_exc:  # noqa: BLE001
        # The body has returned: running it again (requeue) could repeat its effects, a
        # payment charged twice; parking it would invite an operator to replay it. The
        # message is acknowledged and only the result row is lost: say so loudly.
        logger.critical("recovery: task %s succeeded but its SUCCESS result could not be "
                        "stored (%s) nor spooled (%s); the result is lost, the task is not "
                        "run again", task_id, error, spool_exc)
        return None
    logger.warning("recovery: task %s succeeded; its result store failed (%s) and was "
                   "spooled", task_id, error)
    return None


def _scrubbed_message(exc: BaseException, request: Any) -> str:
    """``exc``'s message as a record other than a letter (a fallback use) stores it:
    bounded, with the call's secret values masked (hidden whole if masking fails)."""
    values = result_rows.hidden_in_request(request)
    message = str(exc) if values is not None else redaction.MASK
    return cut(redaction.scrub_text(message, values or []), int(conf.get("MESSAGE_MAX_CHARS")))


def _routing_key(request: Any) -> str:
    """The routing key a run was delivered with, without the delay bits of a retry that
    came through RabbitMQ's delayed delivery: its queue, as a letter and the metrics name
    it ("" for an eager run, which no broker delivered)."""
    return delivered_queue(getattr(request, "delivery_info", None))


def _isolated(what: str, func, *args: Any, **kwargs: Any) -> None:
    """Run bookkeeping that must never change a task's outcome; log what it raises."""
    try:
        func(*args, **kwargs)
    except Exception:  # noqa: BLE001 - bookkeeping is never the task's failure
        logger.exception("recovery: %s failed; the task's outcome stands", what)


class RecoveryTask(Task):
    """Base class for tasks that must survive permanent failures.

    Use it per task (``@app.task(base=RecoveryTask, bind=True, retry_policy=...)``) or
    for every task of a project (``Celery("proj", task_cls="recovery.task:RecoveryTask")``).

    Attributes:
        retry_policy: this task's RetryPolicy (or a dict for ``RetryPolicy.from_dict``);
            None means ``RECOVERY["DEFAULT_POLICY"]``.
        classifier_rules: extra rules for this task, asked before the project's.
        compensate: the task (or its name) that undoes this one's partial effects, e.g.
            ``refund_payment`` for ``charge_payment``. An operator's "compensate" on a
            parked letter runs it with the letter's payload (``recovery.operations.replay.compensate``).
        fallback: a task, callable or dotted path run inline, with the same arguments (and
            ``failure=`` if it accepts it), when the policy gives up; its result stands as
            the task's result and the degradation is recorded (``FallbackUse``). If it
            fails too, the task is parked with both errors.
        dependency: the name of the circuit breaker (``recovery.workflows.circuit``) this task's calls
            count towards; while it is open the task is not run against the dependency.
        when_circuit_open: ``"defer"`` (run again when the circuit may close; no attempt is
            spent) or ``"fallback"``.
        degraded_mode / when_degraded: a degraded-mode switch (``recovery.workflows.degraded``) and
            what the task does while it is on: ``"defer"``, ``"fallback"`` or ``"run"``.
        critical: its first dead letter opens an incident and notifies the on-call
            (``recovery.observe.escalation``), without waiting for a threshold.
        deadline_seconds: how long a run may take before the watchdog calls it stuck;
            None means ``RECOVERY["WATCHDOG"]["TASK_DEADLINE_SECONDS"]``.
    """

    #: This task sends ``task_succeeded`` and ``task_parked`` (:mod:`recovery.events`),
    #: which sagas listen to: what ``Saga.validate`` checks a step for.
    announces_outcome = True
    retry_policy: RetryPolicy | None = None
    classifier_rules: Sequence[Rule] = ()
    compensate: Any = None
    fallback: Any = None
    dependency: str | None = None
    when_circuit_open: str = "defer"
    degraded_mode: str | None = None
    when_degraded: str = "defer"
    critical: bool = False
    deadline_seconds: float | None = None
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # the policy's max_attempts governs; see __init_subclass__
    Request = "recovery.delivery.worker:RecoveryRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        policy = cls.__dict__.get("retry_policy")
        if isinstance(policy, dict):
            cls.retry_policy = RetryPolicy.from_dict(policy)
        elif policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(
                f"{cls.__name__}.retry_policy must be a recovery.RetryPolicy or a dict of its "
                f"fields, not {type(policy).__name__}"
            )
        for option, allowed in (("when_circuit_open", ("defer", "fallback")),
                                ("when_degraded", ("defer", "fallback", "run"))):
            value = cls.__dict__.get(option)
            if value is not None and value not in allowed:
                raise ValueError(f"{cls.__name__}.{option} must be one of {allowed}, not {value!r}")
            if value == "fallback" and cls.fallback is None:
                raise ValueError(f"{cls.__name__}.{option}='fallback' needs fallback=<task or "
                                 f"callable>")
        if cls.__dict__.get("max_retries") is not None:
            logger.warning(
                "%s sets max_retries=%r, which RecoveryTask ignores: set "
                "retry_policy=RetryPolicy(max_attempts=...) instead (attempts count the first run)",
                cls.__name__, cls.__dict__["max_retries"],
            )
            cls.max_retries = None

    # -- result backend -----------------------------------------------------------------

    @property
    def backend(self):  # type: ignore[override]
        real = Task.backend.fget(self)
        wrapped = self.__dict__.get("_recovery_backend")
        if wrapped is None or wrapped._backend is not real:
            wrapped = _ParkAwareBackend(real)
            self.__dict__["_recovery_backend"] = wrapped
        return wrapped

    @backend.setter
    def backend(self, value):
        Task.backend.fset(self, value)

    # -- publishing -----------------------------------------------------------------------

    @result_rows.masked_publish
    def apply_async(self, args=None, kwargs=None, **options):
        """Publish with ``argsrepr``/``kwargsrepr`` masked (:mod:`recovery.store.result_rows`),
        unless the caller chose them: Celery shows these in events, logs and result rows."""
        if options.get("argsrepr") is None and options.get("kwargsrepr") is None:
            reprs = result_rows.masked_reprs(self.name, args or (), kwargs or {}, self.app,
                                             redaction.saga_secret_keys(options))
            if reprs is not None:
                options["argsrepr"], options["kwargsrepr"] = reprs
        return super().apply_async(args, kwargs, **options)

    # -- lifecycle ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return super().__call__(*args, **kwargs)
        started = time.time()
        saga = hdr.read(request, hdr.SAGA)
        if saga:
            if not is_current(saga, request.id, replay=bool(hdr.read(request, hdr.REPLAY))):
                logger.warning("%s[%s]: stale saga message (its step has moved on); dropped "
                               "without running", self.name, request.id)
                raise Ignore()
        if self.degraded_mode and self.when_degraded != "run":
            if degraded.is_on(self.degraded_mode):
                return self._on_degraded(args, kwargs)
        breaker = None
        trial = False
        if self.dependency:
            breaker = Circuit(self.dependency)
            decision = breaker.allow()
            trial = decision.trial
            if not decision.allowed:
                return self._on_circuit_open(
                    CircuitOpenError(self.dependency, decision.retry_in_seconds),
                    decision.retry_in_seconds, args, kwargs)
        try:
            if rehearsals.enabled():
                # Inside the try: an injected failure takes the lifecycle a real one does.
                rehearsals.inject(self, request)
            result = self.run(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except _RetryRequested as requested:
            exc = requested.exc or TransientError("retry requested by the task")
            if breaker is not None:
                _isolated("counting the call on the circuit", breaker.record_exception, exc,
                          classify=self.classify, trial=trial)
            fallback = self._recover_in_call(
                exc, requested.call_args if requested.call_args is not None else args,
                requested.call_kwargs if requested.call_kwargs is not None else kwargs,
                min_delay=requested.min_delay, options=requested.options, started=started)
            if fallback is not None:
                return fallback.value
            raise exc from None
        except Exception as exc:
            if breaker is not None:
                _isolated("counting the call on the circuit", breaker.record_exception, exc,
                          classify=self.classify, trial=trial)
            fallback = self._recover_in_call(exc, args, kwargs, started=started)
            if fallback is not None:
                return fallback.value
            # A bare raise keeps the task's own traceback: no recovery frames for Celery to
            # format, log and store.
            raise
        if breaker is not None:
            _isolated("counting the call on the circuit", breaker.record_success, trial=trial)
        return result

    def _recover_in_call(self, exc: BaseException, args: Any, kwargs: Any,
                         **options: Any) -> _FallbackOutcome | None:
        """:meth:`_recover` as ``__call__`` runs it: a ``Retry`` leaves without the frames
        that published it (``_recover``, ``_schedule_retry``, ``_send_again``,
        ``Task.retry``). Celery formats a Retry's traceback on every retry (billiard's
        ``ExceptionInfo``), which cost more than publishing the retry; those frames tell
        the reader of a log line or RETRY row nothing about the task. The task's own
        exception stays chained (``__context__``), with its traceback."""
        try:
            return self._recover(exc, args, kwargs, **options)
        except Retry as retry:
            raise retry.with_traceback(None)

    # -- circuit breaker, degraded mode, fallback -------------------------------------------

    def _on_circuit_open(self, exc: BaseException, retry_in: float, args: Any, kwargs: Any) -> Any:
        if self.when_circuit_open == "fallback":
            outcome = self._run_fallback(exc, args, kwargs, reason="circuit_open")
            if outcome is not None:
                return outcome.value
        # Spread the herd: every deferred task must not come back in the same second.
        delay = max(0.5, retry_in) * random.uniform(1.0, 1.2)
        logger.info("%s[%s] deferred %.1fs: %s", self.name, self.request.id, delay, exc)
        return self._defer(exc, delay, args, kwargs)

    def _on_degraded(self, args: Any, kwargs: Any) -> Any:
        exc = DependencyError(f"degraded mode {self.degraded_mode!r} is on")
        if self.when_degraded == "fallback":
            outcome = self._run_fallback(exc, args, kwargs, reason="degraded")
            if outcome is not None:
                return outcome.value
        delay = float(conf.get("DEGRADED_DEFER_SECONDS")) * random.uniform(1.0, 1.2)
        logger.info("%s[%s] deferred %.1fs: %s", self.name, self.request.id, delay, exc)
        return self._defer(exc, delay, args, kwargs)

    def _defer(self, exc: BaseException, delay: float, args: Any, kwargs: Any) -> Any:
        """Run again after ``delay`` with the same attempt history: no attempt is spent."""
        request = self.request
        if request.is_eager:
            # apply() runs a deferred call again at once, inline, and would loop until the
            # circuit closes: an eager run spends an attempt instead, bounded by the policy.
            outcome = self._recover(exc, args, kwargs)
            if outcome is not None:
                return outcome.value
            raise exc
        headers = self._carried_headers({name: hdr.read(request, name)
                                         for name in (hdr.HISTORY, hdr.STARTED_AT)})
        try:
            self._send_again(exc, delay, args, kwargs, headers, {})
        except Reject as rejected:
            # Could not publish the deferred run: leave the message to be redelivered.
            raise Reject(rejected.reason, requeue=True) from exc

    def _fallback_callable(self) -> tuple[str, Any]:
        declared = self.fallback
        if inspect.ismethod(declared) and declared.__self__ is self:
            # A plain function given as fallback= is a class attribute: unbind it.
            declared = declared.__func__
        if isinstance(declared, str):
            if declared in self.app.tasks:
                declared = self.app.tasks[declared]
            else:
                declared = import_string(declared)
        name = getattr(declared, "name", None)
        if not name:
            qualname = getattr(declared, "__qualname__", None)
            module = getattr(declared, "__module__", None)
            name = f"{module}.{qualname}" if module and qualname else repr(declared)
        return name, declared

    def _run_fallback(self, exc: BaseException, args: Any, kwargs: Any, *,
                      reason: str) -> _FallbackOutcome | None:
        """Run the fallback inline; None when there is none or it failed (logged; the
        error is kept on ``self.request`` for the letter)."""
        if self.fallback is None:
            return None

        name = repr(self.fallback)
        try:
            # Inside the try: a fallback path that does not resolve is a fallback that
            # failed (the task is parked with both errors), never a lost task.
            name, target = self._fallback_callable()
            call_kwargs = dict(kwargs)
            if _accepts(target, "failure"):
                call_kwargs["failure"] = {"exception_type": exception_path(exc),
                                          "exception_message": str(exc), "reason": reason}
            value = target(*args, **call_kwargs)
        except Exception as fallback_exc:  # noqa: BLE001 - parked with both errors
            logger.error("%s[%s]: fallback %s failed too: %r", self.name, self.request.id, name,
                         fallback_exc)
            self.request._recovery_fallback_error = (name, fallback_exc)
            events.fallback_ran.send(task_name=self.name, reason=reason, succeeded=False,
                                    queue=_routing_key(self.request))
            return None
        events.fallback_ran.send(task_name=self.name, reason=reason, succeeded=True,
                                queue=_routing_key(self.request))
        try:
            FallbackUse.objects.create(
                task_id=self.request.id or "", task_name=self.name, fallback=name, reason=reason,
                dependency=(self.degraded_mode if reason == "degraded" else self.dependency)
                or "",
                exception_type=exception_path(exc),
                exception_message=_scrubbed_message(exc, self.request),
            )
        except Exception as db_exc:  # noqa: BLE001 - the result stands; the record is best effort
            logger.warning("%s[%s]: fallback used, but not recorded (%s)", self.name,
                           self.request.id, db_exc)
        logger.warning("%s[%s] degraded to fallback %s (%s): %s", self.name, self.request.id,
                       name, reason, exc)
        return _FallbackOutcome(value)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        # Bookkeeping after a body that returned (a replayed letter resolved, a saga step
        # recorded): none of it may fail the task, and none may be lost (a write the
        # database refuses is spooled). Its listeners are in recovery.subscriptions.
        events.task_succeeded.send(task=self, task_id=task_id, retval=retval,
                                   request=self.request)
        super().on_success(retval, task_id, args, kwargs)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
        """Ask for a retry; the task's policy decides whether and when.

        ``countdown``/``eta`` become a minimum delay, and an exhausted policy parks the
        task instead of raising ``MaxRetriesExceededError``. ``throw`` is ignored: a
        RecoveryTask's retry always raises.
        """
        request = self.request
        if request.called_directly:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if exc is None:
            exc = sys.exc_info()[1]
        min_delay = countdown
        if eta is not None:
            min_delay = max(0.0, (eta - timezone.now()).total_seconds())
        raise _RetryRequested(exc, min_delay, args, kwargs, options)

    @property
    def attempt_history(self) -> list[dict]:
        """The failed attempts before the current run (this replay only), oldest first.

        Useful to log or return "succeeded after N attempts"; empty on a first run.
        """
        return list(hdr.read(self.request, hdr.HISTORY, []) or [])

    def effect(self, name: str) -> ContextManager[bool]:
        """A transaction for an effect in the application's database that must happen once
        per task, whatever reruns it (a killed worker's redelivery, a retry, a replay)::

            with self.effect("charge") as first:
                if first:
                    Payment.objects.create(order_id=order_id, amount=amount)

        It records ``(task id, name)`` in the same transaction and yields whether this run
        is the first to; an exception inside rolls both back. A saga step records it under
        its step key instead, which a resumed step keeps though its task id is new. See
        docs/effects.md.
        """
        generation = self._effects_generation()
        return effects.effect_once(self._effects_owner(), name, generation=generation,
                                   task_name=self.name)

    def idempotency_key(self, name: str) -> str:
        """A stable key for the external call ``name`` (e.g. a payment API's
        ``Idempotency-Key``): the same across retries, redeliveries and replays of this task
        id (of this saga step, for a step), different for a new call of the task."""
        generation = self._effects_generation()
        return effects.idempotency_key(self._effects_owner(), name, generation)

    def _effects_owner(self) -> str:
        return step_key(self.request) or self.request.id

    def _effects_generation(self) -> int:
        if self.request.id is None:
            raise RuntimeError(f"{self.name}: effects need a task id; call the task through "
                               f"apply_async/delay (or apply), not as a plain function")
        value = hdr.read(self.request, hdr.EFFECTS_GENERATION, 0)
        try:
            generation = int(value)
        except (TypeError, ValueError):
            generation = -1
        if generation < 0:
            # A header no replay of ours wrote: running the effect again on a made-up
            # generation is the one thing the proof exists to prevent.
            raise ValueError(f"{self.name}[{self.request.id}]: header {hdr.EFFECTS_GENERATION}="
                             f"{value!r} is not a generation")
        return generation

    def classify(self, exc: BaseException) -> Failure:
        return classify(exc, rules=(*self.classifier_rules, *conf.classifier_rules()))

    def effective_policy(self) -> RetryPolicy:
        """The policy for the current request (header > task attribute > settings > default)."""
        base = self.retry_policy or default_policy()
        override = hdr.read(self.request, hdr.POLICY)
        if override:
            try:
                return base.merged(override)
            except (TypeError, ValueError) as exc:
                logger.error("%s[%s]: ignoring invalid per-call policy %r: %s",
                             self.name, self.request.id, override, exc)
        return base

    def _recover(self, exc: BaseException, args: Any, kwargs: Any, *,
                 min_delay: float | None = None, options: dict | None = None,
                 started: float | None = None) -> None:
        """Run steps 1-4 of the lifecycle: raises Retry; or returns the fallback's outcome
        when the policy gave up and a fallback stood in; or returns None once ``exc`` is
        parked (the caller then re-raises it so Celery records the failure)."""
        request = self.request
        failure = self.classify(exc)
        events.task_failed.send(task_name=self.name, kind=failure.kind.value,
                                transient=not failure.permanent, queue=_routing_key(request))
        history = list(hdr.read(request, hdr.HISTORY, []) or [])
        # Elapsed time counts from the start of the first attempt of this run.
        started_at = float(hdr.read(request, hdr.STARTED_AT, 0) or 0) or started or time.time()
        policy = self.effective_policy()
        verdict = policy.decide(
            failure,
            # A forged header may hold "5" where a number belongs: read it as one.
            [Attempt(delay_seconds(entry.get("delay_seconds"))) for entry in history],
            exception=exc,
            elapsed_seconds=max(0.0, time.time() - started_at),
        )
        if verdict.retrying and min_delay is not None and min_delay > (verdict.delay_seconds or 0):
            verdict = Verdict.retry(min_delay, verdict.reason + "; honouring requested countdown")
        history.append({
            "at": timezone.now().isoformat(),
            "attempt": len(history) + 1,
            "replay": int(hdr.read(request, hdr.REPLAY, 0) or 0),
            "exception_type": exception_path(exc),
            "exception_message": str(exc)[: int(conf.get("MESSAGE_MAX_CHARS"))],
            "kind": failure.kind.value,
            "delay_seconds": round(verdict.delay_seconds, 3) if verdict.retrying else None,
        })
        if verdict.retrying:
            try:
                self._schedule_retry(exc, verdict, history, started_at, args, kwargs,
                                     options or {})
            except Retry:
                events.retry_scheduled.send(task_name=self.name, kind=failure.kind.value,
                                            queue=_routing_key(request))
                raise
        outcome = self._run_fallback(exc, args, kwargs, reason="gave_up")
        if outcome is not None:
            return outcome
        self._park(exc, failure, verdict, history, args, kwargs)
        return None

    def _schedule_retry(self, exc, verdict, history, started_at, args, kwargs, options) -> None:
        request = self.request
        delay = verdict.delay_seconds or 0.0
        carried = self._carried_headers({hdr.HISTORY: history, hdr.STARTED_AT: started_at})
        headers = {**(options.pop("headers", None) or {}), **carried}
        logger.info("%s[%s] retry in %.2fs: %s (%s)", self.name, request.id, delay,
                    exception_path(exc), verdict.reason)
        try:
            self._send_again(exc, delay, args, kwargs, headers, options)
        except Reject as rejected:
            # Celery rejects (drops) the message when the retry cannot be published;
            # parking instead keeps the task.
            logger.error("%s[%s]: could not publish the retry (%s); parking instead",
                         self.name, request.id, rejected.reason)
            history[-1]["delay_seconds"] = None

    def _carried_headers(self, headers: dict) -> dict:
        """``headers`` (None values dropped) plus the headers every next run carries."""
        carried = {name: value for name, value in headers.items() if value is not None}
        for name in hdr.CARRIED:
            value = hdr.read(self.request, name)
            if value is not None:
                carried[name] = value
        return carried

    def _send_again(self, exc, delay: float, args, kwargs, headers: dict, options: dict) -> None:
        """Publish the next run after ``delay`` and raise Retry: long delays wait in the
        due-table, short ones as a broker ETA message (Celery raises Reject if that
        publish fails)."""
        request = self.request
        options = self._routed_back(options)
        if delay > float(conf.get("BROKER_DELAY_MAX_SECONDS")) and not request.is_eager:
            signature = self.signature_from_request(
                request, args, kwargs, retries=request.retries + 1, headers=headers, **options,
            )
            if self._hold_in_due_table(signature, delay):
                raise Retry(exc=exc, when=delay, sig=signature)
        countdown = broker_delay(self.app, delay)
        if countdown > 0 and not request.is_eager and uses_native_delayed_delivery(self.app):
            # It waits in RabbitMQ, where the watchdog cannot see it: say so.
            broker_waits.note(request.id, countdown)
        Task.retry(self, args=args, kwargs=kwargs, exc=exc, countdown=countdown,
                   max_retries=None, headers=headers, **options)

    def _routed_back(self, options: dict) -> dict:
        """``options`` naming the queue this run was delivered from when the broker delays
        through RabbitMQ's delay exchanges, unless the caller chose a route: there, Celery
        would route a retry of a task sent to another queue to the default one."""
        if (self.request.is_eager or any(options.get(key) for key in ROUTE_OPTIONS)
                or not uses_native_delayed_delivery(self.app)):
            return options
        queue = queue_delivered_from(self.request.delivery_info, self.app.amqp.queues)
        return {**options, "queue": queue} if queue else options

    def _hold_in_due_table(self, signature, delay: float) -> bool:
        try:
            hold(signature, timezone.now() + timedelta(seconds=delay))
        except (DatabaseError, InterfaceError) as db_exc:
            logger.warning("%s[%s]: due-table unavailable (%s); using a broker countdown",
                           self.name, self.request.id, db_exc)
            return False
        return True

    def _park(self, exc, failure: Failure, verdict: Verdict, history, args, kwargs) -> None:
        request = self.request
        store_errors = not self.ignore_result or self.store_errors_even_if_ignored
        real_backend = Task.backend.fget(self)
        tb = "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
        message = str(exc)
        fallback_error = getattr(request, "_recovery_fallback_error", None)
        if fallback_error is not None:
            name, fallback_exc = fallback_error
            message = (f"{message}\n\nThe fallback {name} failed too: "
                       f"{exception_path(fallback_exc)}: {fallback_exc}")
            tb += f"\nThe fallback {name} failed too:\n" + "".join(
                traceback_module.format_exception(type(fallback_exc), fallback_exc,
                                                  fallback_exc.__traceback__))
        result = None
        if store_errors and not request.is_eager:
            # The letter keeps the real text; the FAILURE row, which view_taskresult shows,
            # has the task's secrets scrubbed from it.
            shown_exc, shown_tb = result_rows.scrubbed_failure(
                real_backend, real_backend.prepare_exception(exc), tb,
                result_rows.hidden_in_request(request))
            result = {"result": shown_exc, "traceback": shown_tb}
        record = ParkRecord(
            task_id=request.id,
            task_name=self.name,
            kind=failure.kind.value,
            permanent=failure.permanent,
            reason=verdict.reason if failure.reason in verdict.reason else
            f"{verdict.reason} ({failure.reason})",
            exception_type=exception_path(exc),
            exception_message=message,
            traceback=tb,
            args=_json_safe(list(args)),
            kwargs=_json_safe(dict(kwargs)),
            headers=_json_safe(self._replay_options(request, self.app.amqp.queues)),
            history=history,
            replay=int(hdr.read(request, hdr.REPLAY, 0) or 0),
            queue=_routing_key(request),
            worker=request.hostname or "",
            result=result,
            rehearsal=str(hdr.read(request, hdr.REHEARSAL, "") or ""),
        )
        try:
            outcome = park(record, backend=real_backend, request=request, exc=exc)
        except OSError as spool_exc:
            # Neither the database nor the spool took the letter: leave the message on
            # the broker (requeued) rather than acknowledge a task we could not keep.
            logger.critical("%s[%s]: could not park (database and spool both failed: %s); "
                            "requeueing the message", self.name, request.id, spool_exc)
            raise Reject(spool_exc, requeue=True) from exc
        request._recovery_result_stored = outcome.result_stored
        logger.warning("%s[%s] parked as a dead letter (%s): %s", self.name, request.id,
                       failure.kind.value, verdict.reason)
        events.task_parked.send(task=self, task_id=request.id, request=request, exc=exc,
                                letter_id=outcome.letter_id)

    @staticmethod
    def _replay_options(request, queues=None) -> dict:
        options = {
            key: value for key, value in request.as_execution_options().items()
            if value not in (None, [], {}) and key not in ("task_id", "expires", "retries")
        }
        delivery = request.delivery_info or {}
        options.update(delivered_route(delivery, queues))
        if delivery.get("priority") not in (None, ""):
            options["priority"] = delivery["priority"]
        return options
