"""SQS's own redrive, and its dead-letter queues drained into the ``DeadLetter`` table.

On SQS the second line of defence against a task that keeps killing its worker is the
queue's ``RedrivePolicy``: past ``maxReceiveCount`` receives, SQS moves the message to
the queue's dead-letter queue. recovery's own cap (``MAX_DELIVERIES``) acts first; SQS
acts when recovery could not count (its database was down while the task killed
worker after worker), or for a project that keeps a redrive policy of its own.

Each worker, on a thread of its own (``recovery-sqs-dead-letters``):

1. **Sets the redrive up** once per task queue it consumes (``BROKER_TOPOLOGY`` "auto"):
   a queue without a ``RedrivePolicy`` gets a dead-letter queue ``<queue>-dead-letters``
   (created if missing) and ``maxReceiveCount`` = ``BROKER_DELIVERY_LIMIT``. A policy the
   queue already has is kept as it is (the project's, or an earlier worker's), and its
   dead-letter queue is the one drained. Predefined queues (``predefined_queues``) are
   never created nor changed: their policies are read and their dead-letter queues
   drained. A worker refused ``CreateQueue``/``SetQueueAttributes`` (IAM) says so and
   drains whatever policy the queue has.
2. **Drains** each dead-letter queue: a message becomes a ``poison`` letter (its Celery
   headers, raw body and arguments decoded the way kombu encodes them, SQS's
   ``ApproximateReceiveCount`` as the attempt, ``broker_death`` in the history), and is
   deleted from SQS only after :func:`recovery.store.parking.park` returned (the letter
   committed, or spooled while the database is down). A park that fails leaves the
   message in the dead-letter queue: it is received again once its visibility timeout
   passes. Parking is an upsert by task id, so a message parked twice (a worker died
   between the commit and the delete) is one letter; a message whose task has a parked
   letter already is deleted and leaves that letter as it is.

What real AWS has and a local server may not: ``StartMessageMoveTask`` (the console's
"redrive back to source"), which would send the messages back to run without a letter:
replay letters from the admin instead (docs/brokers.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from django.db import connection as db_connection
from kombu.transport import virtual

from .. import conf
from ..core.kinds import FailureKind
from ..core.names import logger_for
from ..store import db_timeouts
from . import topology
from .housekeeping import Ticker
from .worker import park_poison, parked_already

__all__ = ["SqsDeadLetters", "Redrive", "DeadLetterSource", "decode_sqs_body",
           "park_redriven", "DRAIN_INTERVAL_SECONDS"]

logger = logger_for(__name__)

#: How often each worker looks into its dead-letter queues (one ReceiveMessage per queue;
#: on AWS each is a billed request).
DRAIN_INTERVAL_SECONDS = 2.0
#: Most messages one ReceiveMessage returns.
_BATCH = 10
# kombu's own test for a base64 body (kombu.transport.SQS.Channel.B64_REGEX).
_B64 = re.compile(rb"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")


def decode_sqs_body(raw: str | bytes) -> dict[str, Any]:
    """The kombu envelope an SQS message body carries, decoded as kombu's SQS transport
    decodes it (``Channel._message_to_python``): base64 when the body is exactly that
    (``sqs_base64_encoding``, kombu's default), then JSON. ``{}`` for a body kombu did not
    write."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
    candidate = data.strip()
    if _B64.fullmatch(candidate):
        try:
            decoded = base64.b64decode(candidate, validate=True)
            if base64.b64encode(decoded).rstrip(b"=") == candidate.rstrip(b"="):
                decoded.decode("utf-8")
                data = decoded
        except (binascii.Error, ValueError, UnicodeDecodeError):
            pass
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _celery_body(payload: dict[str, Any]) -> Any:
    """The task message's own body inside kombu's envelope (kombu's virtual transports
    encode it again, base64 by default)."""
    body = payload.get("body")
    encoding = (payload.get("properties") or {}).get("body_encoding")
    codec = virtual.Channel.codecs.get(encoding) if encoding else None
    if codec is None or body is None:
        return body
    try:
        return codec.decode(body)
    except (binascii.Error, ValueError, TypeError):
        return body


@dataclass(frozen=True)
class DeadLetterSource:
    """A task queue and the dead-letter queue its ``RedrivePolicy`` names."""

    queue: str
    queue_url: str
    dead_letter_url: str
    dead_letter_name: str
    max_receive_count: int | None


def park_redriven(message: dict[str, Any], source: DeadLetterSource,
                  hostname: str = "") -> Any:
    """Park one message received from ``source``'s dead-letter queue; returns
    :func:`park`'s outcome, or None when its task is parked already: that letter says
    more than "redriven", and stays as it is."""
    attributes = message.get("Attributes") or {}
    payload = decode_sqs_body(message.get("Body") or "")
    headers = payload.get("headers") if isinstance(payload.get("headers"), dict) else {}
    properties = payload.get("properties") if isinstance(payload.get("properties"), dict) else {}
    task_id = (headers.get("id") or properties.get("correlation_id")
               or (None if payload else message.get("MessageId")))
    if parked_already(task_id):
        logger.info("recovery: %s, moved to %s by SQS redrive, is parked already; dropped "
                    "SQS's copy", task_id, source.dead_letter_name)
        return None
    received = _int_or_none(attributes.get("ApproximateReceiveCount"))
    from_arn = str(attributes.get("DeadLetterQueueSourceArn") or "")
    queue = from_arn.rsplit(":", 1)[-1] if from_arn else source.queue
    limit = source.max_receive_count
    said = (f"SQS redrive moved it to its dead-letter queue {source.dead_letter_name} after "
            f"{received - 1 if received else 'too many'} receives from queue {queue}"
            + (f" (maxReceiveCount {limit})" if limit else "")
            + ": it kept ending its worker and recovery's own delivery cap could not stop it")
    body = _celery_body(payload) if payload else message.get("Body")
    return park_poison(
        task_id=task_id,
        task_name=str(headers.get("task") or ""),
        body=body,
        content_type=str(payload.get("content-type") or ""),
        headers=headers,
        delivery_info={"routing_key": queue},
        exc=None,
        reason=said,
        kind=FailureKind.POISON,
        hostname=hostname,
        attempt=received or 1,
        history_extra={"broker_death": {
            "reason": "sqs_redrive",
            "queue": queue,
            "count": max(1, (received or 1) - 1),
            "time": str(attributes.get("SentTimestamp") or ""),
            "delivery_count": received,
        }},
        # Parked already by its task while the database was down (so not found above):
        # the spooled letter says more than this copy, whichever drains last.
        keep_existing=True,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Redrive:
    """One worker's view of its SQS queues' redrive: set up on first use, then drained.

    ``channel`` is a kombu SQS channel of a connection of its own (it resolves queue
    URLs and hands out boto3 clients with the broker's credentials, region, endpoint and
    predefined queues); ``queues`` are the names of the task queues the worker consumes.
    """

    def __init__(self, channel: Any, queues: list[str], hostname: str = "") -> None:
        self.channel = channel
        self.queues = list(queues)
        self.hostname = hostname
        self.sources: list[DeadLetterSource] | None = None

    def _client(self, sqs_name: str | None = None) -> Any:
        if sqs_name is not None and self.channel.predefined_queues:
            return self.channel.sqs(queue=sqs_name)
        return self.channel.sqs()

    def set_up(self) -> list[DeadLetterSource]:
        """Give each task queue its redrive (when allowed) and learn the dead-letter queues
        to drain. Raises when SQS cannot be reached: the next tick tries again."""
        sources = []
        for queue in self.queues:
            source = self._source_of(queue)
            if source is not None:
                sources.append(source)
        self.sources = sources
        return sources

    def _source_of(self, queue: str) -> DeadLetterSource | None:
        channel = self.channel
        sqs_name = channel.canonical_queue_name(queue)
        predefined = bool(channel.predefined_queues)
        url = channel._new_queue(queue)
        client = self._client(sqs_name)
        attributes = client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["RedrivePolicy", "QueueArn"]).get("Attributes", {})
        policy = _json_object(attributes.get("RedrivePolicy"))
        if not policy and not predefined and conf.get("BROKER_TOPOLOGY") != "off":
            policy = self._give_redrive(client, sqs_name, url)
        target = str(policy.get("deadLetterTargetArn") or "")
        if not target:
            logger.warning("recovery: SQS queue %s has no redrive policy: a task that kills "
                           "its worker while recovery's database is down loops there until "
                           "the message's retention ends (docs/brokers.md)", sqs_name)
            return None
        dead_name = target.rsplit(":", 1)[-1]
        dead_url = self._url_of(client, dead_name, target)
        return DeadLetterSource(queue=sqs_name, queue_url=url, dead_letter_url=dead_url,
                                dead_letter_name=dead_name,
                                max_receive_count=_int_or_none(policy.get("maxReceiveCount")))

    def _give_redrive(self, client: Any, sqs_name: str, url: str) -> dict[str, Any]:
        dead_name = topology.sqs_dead_letter_queue_name(sqs_name)
        try:
            attributes = {"FifoQueue": "true"} if dead_name.endswith(".fifo") else {}
            try:
                dead_url = client.get_queue_url(QueueName=dead_name)["QueueUrl"]
            except client.exceptions.QueueDoesNotExist:
                dead_url = client.create_queue(QueueName=dead_name,
                                               Attributes=attributes)["QueueUrl"]
            arn = client.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])[
                "Attributes"]["QueueArn"]
            policy = topology.sqs_redrive_policy(arn)
            client.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": policy})
        except client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("AccessDenied", "AccessDeniedException"):
                raise
            logger.warning("recovery: not allowed to give SQS queue %s its dead-letter queue "
                           "%s (%s): grant sqs:CreateQueue and sqs:SetQueueAttributes, or set "
                           "its RedrivePolicy yourself (docs/brokers.md)", sqs_name, dead_name,
                           code)
            return {}
        logger.info("recovery: SQS queue %s dead-letters into %s after %s receives",
                    sqs_name, dead_name, topology.delivery_limit())
        return json.loads(policy)

    @staticmethod
    def _url_of(client: Any, name: str, arn: str) -> str:
        parts = arn.split(":")
        owner = parts[4] if len(parts) > 5 else None
        kwargs = {"QueueName": name}
        if owner:
            kwargs["QueueOwnerAWSAccountId"] = owner
        try:
            return client.get_queue_url(**kwargs)["QueueUrl"]
        except client.exceptions.ClientError:
            if owner:
                return client.get_queue_url(QueueName=name)["QueueUrl"]
            raise

    def drain(self, stop: threading.Event | None = None) -> int:
        """Park what waits in the dead-letter queues; returns how many were parked."""
        if self.sources is None:
            self.set_up()
        parked = 0
        for source in self.sources or ():
            client = self._client(source.queue)
            while stop is None or not stop.is_set():
                answer = client.receive_message(
                    QueueUrl=source.dead_letter_url, MaxNumberOfMessages=_BATCH,
                    WaitTimeSeconds=0, MessageSystemAttributeNames=["All"])
                messages = answer.get("Messages") or []
                for message in messages:
                    parked += self._park_one(client, source, message)
                if len(messages) < _BATCH:
                    break
        return parked

    def _park_one(self, client: Any, source: DeadLetterSource, message: dict) -> int:
        try:
            outcome = park_redriven(message, source, self.hostname)
        except Exception:  # noqa: BLE001 - the message stays in SQS: nothing lost
            logger.critical("recovery: could not park a message SQS moved to %s (message id "
                            "%s); it stays there and is received again after its visibility "
                            "timeout", source.dead_letter_name, message.get("MessageId"),
                            exc_info=True)
            return 0
        client.delete_message(QueueUrl=source.dead_letter_url,
                              ReceiptHandle=message["ReceiptHandle"])
        return 0 if outcome is None else 1


def _json_object(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _close_connection() -> None:
    try:
        db_connection.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail too
        pass


class SqsDeadLetters(bootsteps.StartStopStep):
    """Consumer bootstep: SQS's redrive set up and drained (nothing on other brokers,
    and nothing when ``RECOVERY["BROKER_TOPOLOGY"]`` is off)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._ticker: Ticker | None = None
        self._connection: Any = None

    def include_if(self, c: Any) -> bool:
        if conf.get("BROKER_TOPOLOGY") == "off":
            return False
        return topology.broker_kind(c.app.conf.broker_url) == topology.SQS

    def start(self, c: Any) -> None:
        queues = [queue.name for queue in (getattr(c.task_consumer, "queues", None) or ())]
        self._connection = connection = c.app.connection_for_read()
        redrive: list[Redrive] = []

        def drain() -> None:
            # Connected on the thread, not in start(): SQS out of reach delays the
            # drain, never the worker.
            if not redrive:
                redrive.append(Redrive(connection.default_channel, queues, c.hostname or ""))
            redrive[0].drain()

        self._ticker = Ticker(
            "recovery-sqs-dead-letters", [(DRAIN_INTERVAL_SECONDS, drain)],
            on_start=lambda: db_timeouts.bound_thread_connection(statement=True),
            on_exit=_close_connection).start()

    def stop(self, c: Any) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.stop()
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001
                pass

    shutdown = stop
