"""Keep what a live worker holds invisible to the others (Redis and SQS transports).

Redis has no per-message lease: kombu records when each message was handed
out and, past ``visibility_timeout``, gives it to another worker. A long
timeout strands a dead worker's tasks for an hour; a short one re-runs long
tasks and long ETA retries on a second worker (celery#2599, kombu#337). Like
an SQS consumer calling ChangeMessageVisibility, each worker periodically
bumps the delivery time of every message it still holds, so the timeout can
be short: only the messages of a dead worker ever age past it.

On SQS the lease is the broker's own: each message a worker received stays invisible
for the queue's ``VisibilityTimeout``, then SQS gives it to another consumer. Each
worker renews the lease of every message it still holds (running, prefetched, or
waiting for its countdown) with ``ChangeMessageVisibilityBatch``, setting it to
``VISIBILITY_TIMEOUT_SECONDS`` from now. SQS caps one message's invisibility at 12 hours
from its receipt: a task that holds its message longer runs a second time.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Any

from kombu.transport import redis as kombu_redis
from ..core.names import logger_for

__all__ = ["extend_held_messages", "missing_internals", "is_sqs_channel"]

logger = logger_for(__name__)

# kombu's private parts this module relies on (kombu.transport.redis / virtual).
_CHANNEL_ATTRIBUTES = ("unacked_index_key", "conn_or_acquire", "qos")
# ... and of kombu.transport.SQS (not imported: it needs boto3, an optional extra).
# ``_on_messages_ready``: recovery.delivery.sqs_transport repairs it.
_SQS_CHANNEL_ATTRIBUTES = ("sqs", "canonical_queue_name", "visibility_timeout",
                           "predefined_queues", "qos", "_on_messages_ready")
#: SQS changes the visibility of at most 10 messages per call.
_SQS_BATCH = 10


def is_sqs_channel(channel: Any) -> bool:
    """Whether ``channel`` (an instance or a class) is a channel of kombu's SQS transport."""
    cls = channel if isinstance(channel, type) else type(channel)
    if any(klass.__module__.startswith("kombu.transport.SQS") for klass in cls.__mro__):
        return True
    return getattr(getattr(channel, "connection", None), "driver_type", None) == "sqs"


def missing_internals(channel: Any) -> str | None:
    """What is missing, for a Redis or SQS channel (or kombu's ``Channel`` class of either),
    of the kombu internals the extension needs; None when all are there or the transport
    is neither. A kombu upgrade that renamed them would otherwise let held tasks run twice."""
    cls = channel if isinstance(channel, type) else type(channel)
    if channel is not None and is_sqs_channel(channel):
        return _missing_sqs_internals(cls)
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


def _missing_sqs_internals(cls: type) -> str | None:
    missing = [f"Channel.{name}" for name in _SQS_CHANNEL_ATTRIBUTES if not hasattr(cls, name)]
    qos = getattr(cls, "QoS", None)
    for name in ("_delivered", "_dirty"):
        if qos is None or not hasattr(qos, name):
            missing.append(f"QoS.{name}")
    if not missing:
        return None
    return (f"kombu {version('kombu')} has no {', '.join(missing)} (kombu.transport.SQS): "
            f"recovery.delivery.visibility cannot keep held messages invisible, so long tasks would "
            f"run twice. Install a kombu release celery-recovery is tested with (5.7), or upgrade celery-recovery.")


def _extend_sqs(channel: Any) -> int:
    """ChangeMessageVisibility for every message the channel holds, per queue, in batches
    of ten. Messages acknowledged meanwhile are skipped (their receipt is void)."""
    qos = channel.qos
    held = [(tag, message) for tag, message in list((qos._delivered or {}).items())
            if tag not in qos._dirty]
    by_queue: dict[tuple[str, str], list[str]] = {}
    for tag, message in held:
        info = getattr(message, "delivery_info", None) or {}
        if info.get("sqs_queue"):
            by_queue.setdefault((info["sqs_queue"], info.get("routing_key") or ""), []).append(tag)
    timeout = int(channel.visibility_timeout)
    extended = 0
    for (url, routing_key), tags in by_queue.items():
        name = channel.canonical_queue_name(routing_key) if routing_key else None
        client = channel.sqs(queue=name if channel.predefined_queues else None)
        for start in range(0, len(tags), _SQS_BATCH):
            batch = [tag for tag in tags[start:start + _SQS_BATCH]
                     if tag in qos._delivered and tag not in qos._dirty]
            if not batch:
                continue
            answer = client.change_message_visibility_batch(QueueUrl=url, Entries=[
                {"Id": str(index), "ReceiptHandle": tag, "VisibilityTimeout": timeout}
                for index, tag in enumerate(batch)])
            extended += len(answer.get("Successful") or ())
            for failed in answer.get("Failed") or ():
                logger.debug("recovery: SQS did not extend a held message (%s: %s)",
                             failed.get("Code"), failed.get("Message"))
    if extended:
        logger.debug("recovery: extended SQS visibility of %d held message(s)", extended)
    return extended


def extend_held_messages(consumer) -> int:
    """Refresh the visibility of every unacknowledged message on this worker's channel.

    Returns how many were extended. Transports other than Redis are left alone:
    AMQP brokers redeliver on connection loss and need no lease. Raises RuntimeError if
    kombu's Redis internals are missing, rather than silently extending nothing.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    if channel is not None and is_sqs_channel(channel):
        problem = missing_internals(channel)
        if problem:
            raise RuntimeError(problem)
        return _extend_sqs(channel)
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
