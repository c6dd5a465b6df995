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

import logging
import time

__all__ = ["extend_held_messages"]

logger = logging.getLogger(__name__)


def extend_held_messages(consumer) -> int:
    """Refresh the visibility of every unacknowledged message on this worker's channel.

    Returns how many were extended. Transports other than Redis are left alone:
    AMQP brokers redeliver on connection loss and need no lease.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    qos = getattr(channel, "qos", None)
    key = getattr(channel, "unacked_index_key", None)
    if channel is None or qos is None or key is None or not hasattr(channel, "conn_or_acquire"):
        return 0
    tags = list(getattr(qos, "_delivered", {}) or {})
    if not tags:
        return 0
    now = time.time()
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline()
        for start in range(0, len(tags), 500):
            # XX: only refresh members still present (never resurrect an acked message).
            pipe.zadd(key, {tag: now for tag in tags[start:start + 500]}, xx=True)
        pipe.execute()
    logger.debug("recovery: extended visibility of %d held message(s)", len(tags))
    return len(tags)
