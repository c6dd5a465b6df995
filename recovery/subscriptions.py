"""Who listens to what: every receiver recovery connects to :mod:`recovery.events`.

One table, read top to bottom, instead of receivers scattered over the modules: to see
what happens when a letter is parked, find ``letter_parked`` below. Order matters only
within an event, and is the order listed (a replayed letter is resolved before the saga
moves on).

Connected once, from ``RecoveryConfig.ready`` (models are loaded by then); connecting
again is harmless. A project adds its own receivers the same way::

    from recovery import events

    events.letter_parked.connect(my_pager)
"""

from __future__ import annotations

from . import events
from .store import deferred
from .observe import escalation, metrics, notify, sentry
from .observe.cloudwatch import receivers as cloudwatch
from .operations import replay
from .workflows import sagas

__all__ = ["RECEIVERS", "DEFERRED_APPLIERS", "connect"]

RECEIVERS: tuple[tuple[events.Event, tuple], ...] = (
    # metrics.* and cloudwatch.* count only while their backend is in
    # RECOVERY["METRICS_BACKENDS"] (recovery.observe.backends).
    (events.task_failed, (metrics.count_task_failed, cloudwatch.count_task_failed)),
    (events.retry_scheduled, (metrics.count_retry_scheduled, cloudwatch.count_retry_scheduled)),
    (events.fallback_ran, (metrics.count_fallback, cloudwatch.count_fallback)),
    (events.task_succeeded, (replay.resolve_replayed, sagas.step_succeeded)),
    (events.task_parked, (sagas.step_parked,)),
    (events.letter_parked, (metrics.count_parked, cloudwatch.count_parked, sentry.report_parked,
                            escalation.on_parked)),
    (events.bookkeeping_deferred, (metrics.count_deferred, cloudwatch.count_deferred)),
    (events.internal_error, (metrics.count_internal_error, cloudwatch.count_internal_error)),
    (events.replay_finished, (metrics.count_replays, cloudwatch.count_replays)),
    (events.compensation_finished, (metrics.count_compensation, cloudwatch.count_compensation)),
    (events.circuit_changed, (metrics.record_circuit, cloudwatch.record_circuit)),
    (events.saga_needs_human, (escalation.on_saga_needs_human,)),
    (events.incident_opened, (sentry.report_opened_incident,)),
    (events.rehearsal_injected, (metrics.count_rehearsal_injected,)),
    (events.worker_started, (notify.start_delivering,)),
    (events.worker_heartbeat, (metrics.record_heartbeat, cloudwatch.record_heartbeat,
                               notify.on_heartbeat)),
    (events.worker_stopping, (notify.stop_delivering, cloudwatch.stop_publishing)),
)


#: Who applies each kind of bookkeeping write the database refused and the spool kept
#: (:mod:`recovery.store.deferred`). Registered here rather than where each is defined,
#: so that every process that drains the spool can apply every kind, whichever modules
#: it happened to import: an unknown kind would be quarantined for a human.
DEFERRED_APPLIERS: tuple[tuple[str, deferred.Applier], ...] = (
    (deferred.SAGA_SUCCEEDED, sagas.apply_deferred_completion),
    (deferred.REPLAY_SUCCEEDED, replay.apply_deferred_resolution),
)


def connect() -> None:
    """Connect recovery's own receivers and deferred-write appliers (idempotent)."""
    for event, receivers in RECEIVERS:
        for receiver in receivers:
            event.connect(receiver)
    for kind, applier in DEFERRED_APPLIERS:
        deferred.register(kind, applier)
