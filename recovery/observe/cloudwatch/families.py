"""The CloudWatch metrics recovery sends: one :class:`~.emf.Family` per Prometheus
counter of an event, the dimensions it carries and the sets CloudWatch aggregates it by.

Every dimension value is bounded the way the Prometheus labels are
(:mod:`recovery.observe.metrics`): a task name is kept only when the app knows the task,
a queue only when it is one of the app's queues, other values are cut to 120
characters; a task id is never a dimension. CloudWatch bills each distinct combination
of a metric and its dimension values as one metric, so each family has the full
breakdown and, where an alarm needs it, ``Task`` alone (docs/cloudwatch.md#cost).
"""

from __future__ import annotations

from .emf import Family

__all__ = ["TASK_FAILURES", "RETRIES", "DEAD_LETTERS_PARKED", "FALLBACKS", "FALLBACK_FAILURES",
           "INTERNAL_ERRORS", "DEFERRED_WRITES", "REPLAYS", "COMPENSATIONS",
           "CIRCUIT_TRANSITIONS", "WORKER_HEARTBEATS", "ALL", "by_name"]

_TASK = ("Task", "Kind", "Queue")
_FALLBACK = ("Task", "Reason", "Queue")

TASK_FAILURES = Family("TaskFailures", _TASK, (_TASK, ("Task",)),
                       prometheus="recovery_task_failures_total")
RETRIES = Family("Retries", _TASK, (_TASK, ("Task",)), prometheus="recovery_retries_total")
DEAD_LETTERS_PARKED = Family("DeadLettersParked", _TASK, (_TASK, ("Task",)),
                             prometheus="recovery_dead_letters_parked_total")
FALLBACKS = Family("Fallbacks", _FALLBACK, (_FALLBACK, ("Task",)),
                   prometheus="recovery_fallbacks_total")
FALLBACK_FAILURES = Family("FallbackFailures", _FALLBACK, (_FALLBACK, ("Task",)),
                           prometheus="recovery_fallback_failures_total")
INTERNAL_ERRORS = Family("InternalErrors", ("Task", "Exception"),
                         (("Task", "Exception"), ("Task",)),
                         prometheus="recovery_internal_errors_total")
DEFERRED_WRITES = Family("DeferredWrites", ("Type",), (("Type",),),
                         prometheus="recovery_deferred_writes_total")
#: Outcome: published, failed, resolved, parked_again.
REPLAYS = Family("Replays", ("Outcome",), (("Outcome",),), prometheus="recovery_replays_total")
#: Outcome: published, publish_failed, succeeded, failed.
COMPENSATIONS = Family("Compensations", ("Outcome",), (("Outcome",),),
                       prometheus="recovery_compensations_total")
#: State: the state entered (closed, half_open, open).
CIRCUIT_TRANSITIONS = Family("CircuitTransitions", ("Dependency", "State"),
                             (("Dependency", "State"),),
                             prometheus="recovery_circuit_transitions_total")
#: One per heartbeat of a worker's main process; Worker is the node name of its Celery
#: hostname (``w1`` of ``w1@host-7f3a``), which stays the same when a container is
#: replaced. Prometheus keeps the time of the last beat instead (a gauge EMF cannot send
#: usefully: CloudWatch alarms on what arrives, not on what stopped arriving per series).
WORKER_HEARTBEATS = Family("WorkerHeartbeats", ("Worker",), (("Worker",),),
                           prometheus="recovery_worker_heartbeat_timestamp_seconds")

ALL: tuple[Family, ...] = (TASK_FAILURES, RETRIES, DEAD_LETTERS_PARKED, FALLBACKS,
                           FALLBACK_FAILURES, INTERNAL_ERRORS, DEFERRED_WRITES, REPLAYS,
                           COMPENSATIONS, CIRCUIT_TRANSITIONS, WORKER_HEARTBEATS)


def by_name(name: str) -> Family:
    """The family called ``name``; KeyError if recovery sends no such metric."""
    return {family.name: family for family in ALL}[name]
