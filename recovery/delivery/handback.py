"""Tell a clean hand-back from a loss, so that deploys do not count as crashes.

On a clean (warm) shutdown the worker finishes what runs and gives back what it only
held: prefetched messages, and countdown/ETA messages waiting in its memory. The broker
(Redis or RabbitMQ) puts them back marked ``redelivered``, the very mark a message gets when the
worker holding it died, and ``RecoveryRequest`` counts every redelivered receipt
towards ``MAX_DELIVERIES``. So the worker, last thing before its channel hands them
back, tells the delivery counts that these deliveries were not lost
(``recovery.store.deliveries.note_handed_back``). Nothing is written on the normal path: the
cost is two statements per shutdown.

What is not handed back here still counts: a worker killed (SIGKILL, OOM, a cold
shutdown) with messages in hand, a pool child that died, a hard time limit.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.worker.state import active_requests, reserved_requests, scheduled_requests
from django.db import Error as DatabaseError

from ..store.deliveries import note_handed_back
from ..core.names import logger_for

__all__ = ["HandBack", "handed_back_ids", "unstarted_requests"]

logger = logger_for(__name__)


def handed_back_ids(consumer: Any) -> set[str]:
    """Ids of the messages this worker still holds unacknowledged and never started: what
    its channel will give back when it closes.

    Virtual transports (Redis) keep the unacknowledged deliveries on the channel; AMQP
    brokers keep them on the server, so there the worker's own record says which requests
    it received (or holds for their ETA) without starting them."""
    # A task still running here was not handed back: a cold shutdown is ending it.
    running = {request.id for request in tuple(active_requests)}
    task_consumer = getattr(consumer, "task_consumer", None)
    qos = getattr(getattr(task_consumer, "channel", None), "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if delivered is None:
        # Celery forgets its requests when the consumer closes, before any step's shutdown:
        # RecoveryConsumer.on_close kept their ids (unstarted_requests) just before.
        kept = getattr(consumer, "recovery_unstarted", None)
        ids = kept if kept is not None else unstarted_requests()
        started = started_after_close or set()
        return {task_id for task_id in ids if task_id not in running and task_id not in started}
    ids = set()
    for message in list(delivered.values()):
        headers = getattr(message, "headers", None) or {}
        properties = getattr(message, "properties", None) or {}
        task_id = headers.get("id") or properties.get("correlation_id")
        if task_id and task_id not in running:
            ids.add(str(task_id))
    return ids


#: Ids of requests a pool child started after the consumer closed (a warm shutdown lets
#: the pool run what it was given): they were not handed back. None until the consumer
#: closes, so the normal path records nothing.
started_after_close: set[str] | None = None


def note_started(task_id: str) -> None:
    """A pool child started ``task_id`` (RecoveryRequest.on_accepted)."""
    if started_after_close is not None:
        started_after_close.add(task_id)


def unstarted_requests() -> set[str]:
    """Ids of the requests this worker received (or holds for their ETA) and never
    started: what an AMQP broker gives back when the worker's channel closes."""
    running = set(tuple(active_requests))
    return {str(request.id) for request in (*tuple(reserved_requests),
                                            *tuple(scheduled_requests))
            if request.id and request not in running}


class HandBack(bootsteps.StartStopStep):
    """Consumer bootstep: on shutdown (after the pool finished its tasks, before the
    channel closes and gives the rest back), take back the deliveries given back unused."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def shutdown(self, c: Any) -> None:
        try:
            ids = handed_back_ids(c)
        except Exception:  # noqa: BLE001 - bookkeeping never stops a shutdown
            logger.exception("recovery: could not list the messages handed back")
            return
        if not ids:
            return
        try:
            note_handed_back(ids)
        except DatabaseError as exc:
            # They will count as one lost delivery each: the cap is reached one deploy early.
            logger.warning("recovery: could not record %d message(s) handed back unused "
                           "(database: %s); their next delivery counts as a loss", len(ids), exc)
            return
        logger.info("recovery: %d message(s) handed back unused; not counted as lost", len(ids))
