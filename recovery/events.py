"""What the failure lifecycle announces, so that the parts that watch it need not be called.

The lifecycle (:mod:`recovery.task`, the store, the worker, operations and workflows)
says what happened by sending an event; metrics, escalation, Sentry, sagas and the
replay service listen. The sender therefore imports nothing of the listener: a letter
is parked without the store knowing that Prometheus or an incident exists, and a new
observer is one more ``connect`` in :mod:`recovery.subscriptions`, not one more import
inside a function.

Each receiver runs in its own ``try``: what one raises is logged and the others still
hear the event. This is the rule "our bookkeeping is never the task's failure" made
structural: a broken exporter cannot stop a letter from being parked, nor fail a task
whose body succeeded.

Receivers take keyword arguments only, the event's ``fields``, and should accept
``**extra`` so an event can grow a field without breaking them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import Reject
from django.db import transaction

__all__ = [
    "Event",
    "ALL",
    "task_failed",
    "retry_scheduled",
    "fallback_ran",
    "task_succeeded",
    "task_parked",
    "letter_parked",
    "bookkeeping_deferred",
    "internal_error",
    "replay_finished",
    "compensation_finished",
    "circuit_changed",
    "saga_needs_human",
    "incident_opened",
    "rehearsal_injected",
    "worker_started",
    "worker_heartbeat",
    "worker_stopping",
]

logger = logging.getLogger(__name__)

Receiver = Callable[..., Any]


class Event:
    """One kind of thing that happened, and the receivers that want to hear of it.

    Connect at start-up (:func:`recovery.subscriptions.connect` does it for recovery's
    own listeners, from ``AppConfig.ready``). Connecting the same receiver twice keeps
    one, so a second ``connect`` is harmless.
    """

    def __init__(self, name: str, doc: str, *, fields: tuple[str, ...],
                 may_raise: tuple[type[BaseException], ...] = ()) -> None:
        self.name = name
        #: the keyword arguments every ``send`` passes (checked by tests/recovery/test_events.py
        #: against each call site and each receiver of recovery's own)
        self.fields = fields
        self.__doc__ = f"{doc}\n\nFields: {', '.join(fields)}."
        #: what a receiver may raise to the sender on purpose (anything else is logged)
        self.may_raise = may_raise
        self._receivers: tuple[Receiver, ...] = ()

    def connect(self, receiver: Receiver) -> Receiver:
        """Have ``receiver(**fields)`` called on every :meth:`send`; usable as a decorator."""
        if receiver not in self._receivers:
            self._receivers = (*self._receivers, receiver)
        return receiver

    def disconnect(self, receiver: Receiver) -> None:
        self._receivers = tuple(r for r in self._receivers if r != receiver)

    @property
    def receivers(self) -> tuple[Receiver, ...]:
        return self._receivers

    def send(self, **fields: Any) -> None:
        """Call every receiver, in the order they connected, each in its own ``try``."""
        for receiver in self._receivers:
            try:
                receiver(**fields)
            except self.may_raise:
                raise
            except Exception:  # noqa: BLE001 - a listener never changes what happened
                logger.exception("recovery: a receiver of %s (%s) failed; the task's outcome "
                                 "stands", self.name, getattr(receiver, "__qualname__", receiver))

    def send_on_commit(self, **fields: Any) -> None:
        """:meth:`send` once the current transaction commits (at once outside one), so an
        outcome that is rolled back is not announced."""
        try:
            transaction.on_commit(lambda: self.send(**fields))
        except Exception:  # noqa: BLE001 - an announcement never fails the sender
            logger.exception("recovery: could not announce %s", self.name)

    def __repr__(self) -> str:
        return f"<Event {self.name}: {len(self._receivers)} receiver(s)>"


# -- a task's run (recovery.task) -------------------------------------------------------------

task_failed = Event("task_failed", """A task's body raised and was classified.

``kind`` is a ``FailureKind`` value; ``transient`` whether a retry may heal it; ``queue``
the routing key the run was delivered with ("" when run eagerly).""",
                    fields=("task_name", "kind", "transient", "queue"))

retry_scheduled = Event("retry_scheduled", """A failed task was sent again after a backoff.

``queue`` is the routing key of the run that failed.""",
                        fields=("task_name", "kind", "queue"))

fallback_ran = Event("fallback_ran", """A task's fallback ran in its place.

``reason`` is ``gave_up`` (the policy gave up on the task), ``circuit_open`` or
``degraded``; ``succeeded`` is False when
the fallback raised too; ``queue`` is the routing key of the run it stood in for.""",
                   fields=("task_name", "reason", "succeeded", "queue"))

task_succeeded = Event("task_succeeded", """A task's body returned; sent from ``on_success``.

Listeners do the bookkeeping a success implies (a replayed letter is resolved, a saga
moves on); each spools what the database refuses. A listener that could keep its record
nowhere (database and spool both refused) raises ``Reject(requeue=True)``: the message
comes back and the idempotent task runs again rather than lose the record.""",
                       fields=("task", "task_id", "retval", "request"), may_raise=(Reject,))

task_parked = Event("task_parked", """A task failed for good and its letter is kept.

``letter_id`` is None when the letter went to the spool.""",
                    fields=("task", "task_id", "request", "exc", "letter_id"))

# -- the store (recovery.store) ---------------------------------------------------------------

letter_parked = Event("letter_parked", """A dead letter was written, or spooled.

``record`` is the ``ParkRecord`` as stored, arguments unmasked: a receiver that shows or
forwards it masks it first (``recovery.core.redaction``). ``letter_id`` is None while it
is spooled; ``exc`` is the exception when the parker had it; ``first_report`` is False
when a spooled letter reaches the database later (it was counted and reported when it
was spooled).""",
                      fields=("record", "letter_id", "exc", "first_report"))

bookkeeping_deferred = Event("bookkeeping_deferred", """A bookkeeping write the database
refused went to the spool, for its drain to apply.

``kind`` is ``result``, ``replay_succeeded`` or ``saga_succeeded``.""", fields=("kind",))

# -- the worker (recovery.delivery) -----------------------------------------------------------

internal_error = Event("internal_error", """Recovery's own code failed around a task; the
message was acknowledged as Celery does for a failure, and nothing was parked.

``error_type`` is the exception's class name.""", fields=("task_name", "error_type"))

worker_started = Event("worker_started", """A worker's housekeeping started (its consumer
bootstep).""", fields=("hostname",))

worker_heartbeat = Event("worker_heartbeat", """A worker's housekeeping is alive, every
``HEARTBEAT_INTERVAL_SECONDS``, from the consumer's timer.""", fields=("hostname",))

worker_stopping = Event("worker_stopping", """A worker's housekeeping is stopping.

``timeout_seconds`` is how long a listener may wait for its own thread.""",
                        fields=("hostname", "timeout_seconds"))

# -- operations (recovery.operations) ---------------------------------------------------------

replay_finished = Event("replay_finished", """Replays reached an outcome.

``outcome`` is ``published``, ``failed`` or ``resolved``; ``count`` how many letters.""",
                        fields=("outcome", "count"))

compensation_finished = Event("compensation_finished", """A compensation reached an outcome.

``outcome`` is ``published``, ``publish_failed``, ``succeeded`` or ``failed``.""",
                              fields=("outcome",))

# -- workflows (recovery.workflows) -----------------------------------------------------------

circuit_changed = Event("circuit_changed", """A dependency's circuit breaker changed state.

``state`` is ``closed``, ``half_open`` or ``open``.""", fields=("dependency", "state"))

saga_needs_human = Event("saga_needs_human", """A saga run cannot finish on its own: a
compensation failed for good, so data may be inconsistent.

``run`` is the ``SagaRun``; ``reason`` one line, already scrubbed; ``failed_step`` the
``SagaStep`` that failed last (or None); ``hidden`` the run's secret values, for
scrubbing what a listener quotes.""", fields=("run", "reason", "failed_step", "hidden"))

# -- escalation (recovery.observe) ------------------------------------------------------------

incident_opened = Event("incident_opened", """An incident was opened (not one added to).

``occurrence`` is what opened it; ``rules`` the escalation rules in force.""",
                        fields=("incident", "occurrence", "rules"))

# -- rehearsals (recovery.workflows.rehearsals) -------------------------------------------------

rehearsal_injected = Event("rehearsal_injected", """A running rehearsal hit a task's run with its fault.

``rehearsal`` is the rehearsal's id (as a string, as letters and metrics carry it);
``fault`` one of permanent, transient, timeout, hang, kill.""",
                           fields=("rehearsal", "task_name", "fault"))

ALL: tuple[Event, ...] = tuple(value for value in dict(globals()).values()
                               if isinstance(value, Event))
