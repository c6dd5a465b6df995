"""Move what RabbitMQ dead-lettered into the ``DeadLetter`` table.

RabbitMQ's delivery limit (:mod:`recovery.delivery.topology`) stops a message that keeps
coming back, even when recovery's own delivery cap could not act on it (its database
was down while the task killed worker after worker). RabbitMQ then routes it to
``recovery.dead_letters``; a letter living only in a broker queue is one no operator
sees, so every worker drains that queue: each message becomes a ``poison`` letter with
its raw body, its arguments when they decode, and the broker's ``x-death`` account in
the attempt history. The message is acknowledged only once the letter is written or
spooled (:func:`recovery.store.parking.park`), so a worker dying in between leaves it
in the queue for the next one, and parking by task id makes the second drain of the
same message a no-op.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import bootsteps
from kombu import Consumer

from .. import conf
from ..core.kinds import FailureKind
from ..core.names import logger_for
from . import topology
from .worker import park_poison, parked_already

__all__ = ["BrokerDeadLetters", "park_dead_lettered", "death_account"]

logger = logger_for(__name__)

#: How long a dead-lettered message that could not be parked waits before it is tried again.
RETRY_PARK_SECONDS = 10.0


def death_account(headers: dict | None) -> dict[str, Any]:
    """What RabbitMQ says about why it gave a message up: the newest ``x-death`` entry
    (reason, queue, count, time) and the delivery count quorum queues keep."""
    headers = headers or {}
    deaths = headers.get("x-death") or []
    latest = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    when = latest.get("time")
    return {
        "reason": str(latest.get("reason") or headers.get("x-first-death-reason") or "unknown"),
        "queue": str(latest.get("queue") or headers.get("x-first-death-queue") or ""),
        "count": int(latest.get("count") or 1),
        "time": when.isoformat() if isinstance(when, datetime) else str(when or ""),
        "delivery_count": _int_or_none(headers.get("x-delivery-count")),
    }


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def park_dead_lettered(message: Any, hostname: str = "") -> Any:
    """Park one message RabbitMQ dead-lettered; returns :func:`park`'s outcome, or None
    when its task is parked already (a task that raised ``Reject`` after recovery parked
    it, say): that letter says more than "rejected", and stays as it is."""
    headers = dict(message.headers or {})
    properties = dict(message.properties or {})
    task_id = headers.get("id") or properties.get("correlation_id")
    if parked_already(task_id):
        logger.info("recovery: %s, dead-lettered by RabbitMQ, is parked already; dropped "
                    "the broker's copy", task_id)
        return None
    death = death_account(headers)
    deliveries = death["delivery_count"]
    if death["reason"] == "delivery_limit":
        said = (f"RabbitMQ dead-lettered it after {deliveries or 'too many'} deliveries from "
                f"queue {death['queue'] or '?'} (its delivery limit): it kept ending its "
                "worker and recovery's own delivery cap could not stop it")
    else:
        said = (f"RabbitMQ dead-lettered it from queue {death['queue'] or '?'} "
                f"(reason: {death['reason']})")
    return park_poison(
        task_id=task_id,
        task_name=str(headers.get("task") or ""),
        body=message.body,
        content_type=message.content_type or "",
        headers=headers,
        delivery_info={"routing_key": death["queue"]
                       or (message.delivery_info or {}).get("routing_key")},
        exc=None,
        reason=said,
        kind=FailureKind.POISON,
        hostname=hostname,
        attempt=(deliveries + 1) if deliveries is not None else 1,
        history_extra={"broker_death": death},
        # Parked already by its task while the database was down (so not found above):
        # the spooled letter says more than this copy, whichever drains last.
        keep_existing=True,
    )


class BrokerDeadLetters(bootsteps.ConsumerStep):
    """Consumer bootstep: drain ``recovery.dead_letters`` on RabbitMQ (nothing elsewhere,
    and nothing when ``RECOVERY["BROKER_TOPOLOGY"]`` is off)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.hostname = getattr(parent, "hostname", "") or ""
        self.timer: Any = None

    def start(self, c: Any) -> None:
        self.timer = c.timer
        super().start(c)

    def include_if(self, c: Any) -> bool:
        if conf.get("BROKER_TOPOLOGY") == "off":
            return False
        return c.app.connection_for_read().transport.driver_type == topology.AMQP

    def get_consumers(self, channel: Any) -> list[Consumer]:
        # Declared here too (not only by the task queues' arguments): RabbitMQ drops what
        # it dead-letters into an exchange that does not exist.
        return [Consumer(channel, queues=[topology.dead_letter_queue()],
                         on_message=self.on_message, accept=None, prefetch_count=10)]

    def on_message(self, message: Any) -> None:
        try:
            park_dead_lettered(message, self.hostname)
        except Exception:  # noqa: BLE001 - the message stays in RabbitMQ: nothing lost
            logger.critical("recovery: could not park a message RabbitMQ dead-lettered (task "
                            "id %s); it goes back to %s in %.0fs to be tried again",
                            (message.headers or {}).get("id"), topology.DEAD_LETTER_QUEUE,
                            RETRY_PARK_SECONDS, exc_info=True)
            self._requeue_later(message)
            return
        message.ack()

    def _requeue_later(self, message: Any) -> None:
        """Give the message back after a pause: held unacknowledged, it would take one of
        the drain's prefetch slots until the connection closes, and ten failures would
        stop the drain; given back at once, it would loop as fast as parking fails."""
        def requeue() -> None:
            try:
                message.reject(requeue=True)
            except Exception:  # noqa: BLE001 - channel gone: RabbitMQ requeues it itself
                logger.warning("recovery: could not give back a dead-lettered message; "
                               "RabbitMQ requeues it when the channel closes", exc_info=True)

        if self.timer is None:
            requeue()
        else:
            self.timer.call_after(RETRY_PARK_SECONDS, requeue)
