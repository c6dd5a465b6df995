"""Which broker a Celery app talks to, and what its delays can express.

Pure reading of the app's configuration, so that the task, the outbox and the worker
agree on it without importing the worker side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["AMQP", "REDIS", "SQS", "broker_kind", "uses_native_delayed_delivery",
           "broker_delay", "delivered_queue", "delivered_route", "queue_delivered_from"]

AMQP = "amqp"
REDIS = "redis"
SQS = "sqs"
_KINDS = {
    "amqp": AMQP, "pyamqp": AMQP, "amqps": AMQP, "librabbitmq": AMQP,
    "redis": REDIS, "rediss": REDIS, "redis+socket": REDIS, "sentinel": REDIS,
    "sqs": SQS,
}


def broker_kind(url: str | None) -> str:
    """``amqp``, ``redis``, ``sqs``, or the URL's scheme for any other transport
    (``filesystem``, ``memory``): the first URL of a failover list decides."""
    first = str(url or "").split(";", 1)[0].strip()
    scheme = urlsplit(first).scheme.lower() if "://" in first else first.lower()
    return _KINDS.get(scheme, scheme)


def uses_native_delayed_delivery(app: Any) -> bool:
    """Whether Celery publishes this app's countdowns through RabbitMQ's native delayed
    delivery (it does on AMQP once a task queue is a quorum queue)."""
    if broker_kind(app.conf.broker_url) != AMQP:
        return False
    return any((queue.queue_arguments or {}).get("x-queue-type") == "quorum"
               for queue in app.amqp.queues.values())


def broker_delay(app: Any, seconds: float) -> float:
    """A countdown the app's broker can carry. RabbitMQ's native delayed delivery counts
    whole seconds and Celery (5.7) refuses a countdown below one there ("countdown must
    be a positive number"): round up, so a retry never runs before its backoff nor fails
    to publish."""
    if seconds > 0 and uses_native_delayed_delivery(app):
        return float(max(1, math.ceil(seconds)))
    return seconds


# Celery's native delayed delivery routes a delayed message through exchanges named
# ``celery_delayed_<level>`` / ``celery_delayed_delivery`` (with an optional prefix),
# under a routing key of 28 delay bits before the original key: "0.0.…1.celery".
_DELAY_BITS = re.compile(r"^(?:[01]\.){28}(?P<key>.+)$")
_DELAY_EXCHANGE = re.compile(r"^(?:.+_)?celery_delayed_(?:delivery|\d+)$")


def delivered_queue(delivery_info: Mapping | None) -> str:
    """The routing key a message was sent with, as a letter and a metric name its queue:
    without the delay bits a retry carried through RabbitMQ's delayed delivery."""
    routing_key = str((delivery_info or {}).get("routing_key") or "")
    match = _DELAY_BITS.match(routing_key)
    return match.group("key") if match else routing_key


def delivered_route(delivery_info: Mapping | None,
                    queues: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``exchange``/``routing_key`` to publish a message again where it was delivered
    from (a replay). A message that came through delayed delivery names the delay
    exchange, which would route it by its bits: the task queue with its routing key is
    named instead (``queue``, when the app declares it), else the routing key alone."""
    delivery = delivery_info or {}
    exchange = delivery.get("exchange")
    routing_key = delivered_queue(delivery)
    if not (isinstance(exchange, str) and _DELAY_EXCHANGE.match(exchange)):
        return {key: value for key, value in (("exchange", exchange),
                                              ("routing_key", delivery.get("routing_key")))
                if value not in (None, "")}
    for name, queue in (queues or {}).items():
        if getattr(queue, "routing_key", None) == routing_key:
            return {"queue": name}
    return {"routing_key": routing_key} if routing_key else {}


def queue_delivered_from(delivery_info: Mapping | None,
                         queues: Mapping[str, Any] | None) -> str | None:
    """The name of the app's queue a message was delivered from: the queue whose routing
    key the message carried (without delay bits), or None when the app declares none.

    A retry on native delayed delivery must name it: Celery (5.7) takes the delay's
    routing key from the queue its router picks, the default queue unless one is named,
    and would send the retry of a task routed elsewhere to the default queue."""
    routing_key = delivered_queue(delivery_info)
    if not routing_key:
        return None
    for name, queue in (queues or {}).items():
        if getattr(queue, "routing_key", None) == routing_key:
            return name
    return None
