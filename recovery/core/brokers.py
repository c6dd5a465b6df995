"""Which broker a Celery app talks to, and what its delays can express.

Pure reading of the app's configuration, so that the task, the outbox and the worker
agree on it without importing the worker side.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

__all__ = ["AMQP", "REDIS", "SQS", "broker_kind", "uses_native_delayed_delivery",
           "broker_delay"]

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
