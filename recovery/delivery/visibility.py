"""Keep what a live worker holds invisible to the others (Redis transport).

Redis has no per-message lease: kombu records when each message was handed
out and, past ``visibility_timeout``, gives it to another worker. A long
timeout strands a dead worker's tasks for an hour; a short one re-runs long
tasks and long ETA retries on a second worker (celery#2599, kombu#337). Like
an SQS consumer calling ChangeMessageVisibility, each worker periodically
bumps the delivery time of every message it still holds, so the timeout can
be short: only the messages of a dead worker ever age past it.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Any

from kombu.transport import redis as kombu_redis
from ..core.names import logger_for

__all__ = ["extend_held_messages", "missing_internals"]

logger = logger_for(__name__)

# kombu's private parts this module relies on (kombu.transport.redis / virtual).
_CHANNEL_ATTRIBUTES = ("unacked_index_key", "conn_or_acquire", "qos")


def missing_internals(channel: Any) -> str | None:
    """What is missing, for a Redis channel (or kombu's Redis ``Channel`` class), of the
    kombu internals the extension needs; None when all are there or the transport is not
    Redis. A kombu upgrade that renamed them would otherwise let held tasks run twice."""
    cls = channel if isinstance(channel, type) else type(channel)
    if channel is None or not issubclass(cls, kombu_redis.Channel):
        return None
    missing = [f"Channel.{name}" for name in _CHANNEL_ATTRIBUTES if not hasattr(channel, name)]
    qos = getattr(cls, "QoS", None) if isinstance(channel, type) else getattr(channel, "qos", None)
    if qos is None or not hasattr(qos, "_delivered"):
        missing.append("QoS._delivered")
    if not missing:
        return None
    return (f"kombu {version('kombu')} has no {', '.join(missing)} (kombu.transport.redis): "
            f"recovery.delivery.visibility cannot keep held messages invisible, so long tasks would "
            f"run twice. Install a kombu release celery-recovery is tested with (5.7), or upgrade celery-recovery.")


def extend_held_messages(consumer) -> int:
    """Refresh the visibility of every unacknowledged message on this worker's channel.

    Returns how many were extended. Transports other than Redis are left alone:
    AMQP brokers redeliver on connection loss and need no lease. Raises RuntimeError if
    kombu's Redis internals are missing, rather than silently extending nothing.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    if channel is None or not isinstance(channel, kombu_redis.Channel):
        return 0
    problem = missing_internals(channel)
    if problem:
        raise RuntimeError(problem)
    # Called from the recovery-visibility thread: list() copies the keys without
    # releasing the GIL, so the consumer cannot change the dict midway.
    tags = list(channel.qos._delivered or {})
    if not tags:
        return 0
    key = channel.unacked_index_key
    now = time.time()
    # A client of its own from the channel's pool (thread-safe), not the consumer's.
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline()
        for start in range(0, len(tags), 500):
            # XX: only refresh members still present (never resurrect an acked message).
            pipe.zadd(key, {tag: now for tag in tags[start:start + 500]}, xx=True)
        pipe.execute()
    logger.debug("recovery: extended visibility of %d held message(s)", len(tags))
    return len(tags)
