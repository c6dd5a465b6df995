"""What the broker must look like for recovery's guarantees, chosen by the broker's URL.

A project picks its broker with one variable (``CELERY_BROKER_URL``); ``recovery.setup``
derives the rest here, when Celery reads its configuration:

* **Redis** (and other virtual transports): a visibility timeout, and a faster scan for
  messages stranded by a dead worker (:mod:`recovery.delivery.visibility` keeps live
  workers' messages invisible).
* **RabbitMQ** (``amqp://``, ``pyamqp://``): quorum queues on a topic exchange, publisher
  confirms, and a broker-side delivery limit with a dead-letter exchange as the second
  line of defence against crash loops. recovery's own delivery cap
  (``RECOVERY["MAX_DELIVERIES"]``, :mod:`recovery.store.deliveries`) parks a task that
  keeps killing its worker; when it cannot (its database is down, say), RabbitMQ stops
  the loop after ``RECOVERY["BROKER_DELIVERY_LIMIT"]`` deliveries and
  dead-letters the message, and the workers move it into the ``DeadLetter`` table
  (:mod:`recovery.delivery.broker_dead_letters`). Countdown retries use Celery's native
  delayed delivery, which needs exactly these queues. There is no visibility timeout on
  RabbitMQ: an unacknowledged message returns the moment its worker's connection dies.
* **Amazon SQS** (``sqs://``): kombu's SQS transport repaired to outlive an unanswered
  poll (:mod:`recovery.delivery.sqs_transport`), the queues' visibility timeout, which live workers extend
  (ChangeMessageVisibility, :mod:`recovery.delivery.visibility`); on a loopback host (a
  local SQS-API server such as moto or ElasticMQ) plain HTTP and a region of its own,
  on AWS the region from the environment. Each task queue gets SQS's own redrive: a
  dead-letter queue (``<queue>-dead-letters``) and a ``RedrivePolicy`` with
  ``maxReceiveCount`` = ``BROKER_DELIVERY_LIMIT``, set by the workers when the queue has
  none (:mod:`recovery.delivery.sqs_dead_letters`, which also drains it into the
  ``DeadLetter`` table).

A project that declares its own ``task_queues`` keeps them as they are (the system check
``recovery.W020`` says what its queues lack); ``RECOVERY["BROKER_TOPOLOGY"] = "off"``
leaves every broker setting alone. Switching an existing RabbitMQ ``celery`` queue from
classic to quorum needs that queue drained and deleted first (docs/brokers.md): RabbitMQ
refuses to redeclare a queue with other arguments.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery.app.amqp import AMQP as CeleryAMQP, Queues
from kombu import Exchange, Queue

from .. import conf
from ..core.brokers import AMQP, REDIS, SQS, broker_kind

__all__ = [
    "AMQP",
    "REDIS",
    "SQS",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "broker_kind",
    "delivery_limit",
    "quorum_queue_arguments",
    "dead_letter_queue",
    "SQS_DEAD_LETTER_SUFFIX",
    "SQS_TRANSPORT",
    "sqs_transport_options",
    "sqs_dead_letter_queue_name",
    "sqs_redrive_policy",
    "is_loopback_url",
    "apply",
    "ProtectedAMQP",
]

#: Where RabbitMQ sends what exceeded its delivery limit, and the queue the workers drain.
DEAD_LETTER_EXCHANGE = "recovery.dead_letter"
DEAD_LETTER_QUEUE = "recovery.dead_letters"

#: The name of the dead-letter queue the workers give an SQS task queue: ``celery`` ->
#: ``celery-dead-letters`` (``orders.fifo`` -> ``orders-dead-letters.fifo``: SQS wants a
#: FIFO queue's dead-letter queue to be FIFO too).
SQS_DEAD_LETTER_SUFFIX = "-dead-letters"
#: SQS's longest queue name.
_SQS_NAME_MAX = 80
#: kombu's SQS transport, repaired so that an unanswered poll does not stop the worker
#: (:mod:`recovery.delivery.sqs_transport`); by name: it imports boto3.
SQS_TRANSPORT = "recovery.delivery.sqs_transport:Transport"
#: The region of a local SQS-API server when the environment names none.
_LOCAL_REGION = "us-east-1"


def delivery_limit() -> int:
    """RabbitMQ's ``x-delivery-limit`` and SQS's ``maxReceiveCount``: past recovery's own cap, so that the broker only
    acts when recovery could not. A setting of its own rather than derived from
    ``MAX_DELIVERIES``: it is fixed when a queue is first declared."""
    return int(conf.get("BROKER_DELIVERY_LIMIT"))


def quorum_queue_arguments() -> dict[str, Any]:
    """Arguments of a task queue on RabbitMQ: quorum, delivery-limited, dead-lettered
    at least once (RabbitMQ keeps a dead-lettered message until the dead-letter queue
    confirms it, which needs ``reject-publish`` overflow)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit(),
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def dead_letter_queue() -> Queue:
    """The queue RabbitMQ dead-letters into, bound to a fanout exchange so that every task
    queue's dead letters land in it whatever their routing key."""
    exchange = Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
    return Queue(DEAD_LETTER_QUEUE, exchange, routing_key="#", durable=True,
                 queue_arguments={"x-queue-type": "quorum"})


def apply(app_conf: Any) -> None:
    """Complete a Celery app's configuration for its broker (see the module docstring).
    Settings the project made itself win."""
    topology = conf.get("BROKER_TOPOLOGY")
    if topology == "off":
        return
    kind = broker_kind(app_conf.broker_url)
    if kind == AMQP:
        _rabbitmq(app_conf)
    elif kind == SQS:
        options = dict(app_conf.broker_transport_options or {})
        for name, value in sqs_transport_options(app_conf.broker_url).items():
            options.setdefault(name, value)
        app_conf.broker_transport_options = options
        if not app_conf.broker_transport:
            app_conf.broker_transport = SQS_TRANSPORT
    else:
        _virtual_transport(app_conf)


def is_loopback_url(url: str | None) -> bool:
    """Whether a broker URL names this machine (``localhost``, ``127.0.0.0/8``, ``::1``):
    a local SQS-API server, not AWS."""
    first = str(url or "").split(";", 1)[0].strip()
    try:
        host = urlsplit(first).hostname or ""
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sqs_transport_options(url: str | None) -> dict[str, Any]:
    """kombu's SQS transport options recovery derives from the URL (the project's own
    ``broker_transport_options`` win, key by key):

    * ``visibility_timeout``: ``VISIBILITY_TIMEOUT_SECONDS`` in whole seconds, the
      ``VisibilityTimeout`` of the queues kombu creates: how long a dead worker's messages
      stay invisible. Live workers extend theirs.
    * ``region``: ``AWS_REGION`` or ``AWS_DEFAULT_REGION``; for a local server without
      either, ``us-east-1``. On AWS without either, kombu asks boto3 (``~/.aws/config``).
    * a local server (loopback host) speaks plain HTTP (``is_secure`` off: kombu then
      builds ``endpoint_url`` as ``http://host:port``), and is long-polled for one second
      at a time: a message a worker gives back becomes visible again after
      ``wait_time_seconds`` (kombu's requeue), and polling a local server costs nothing.
      On AWS kombu's own 10-second long polls stay (each empty receive is billed).
    """
    options: dict[str, Any] = {
        "visibility_timeout": max(0, math.ceil(float(conf.get("VISIBILITY_TIMEOUT_SECONDS")))),
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if is_loopback_url(url):
        options.update(region=region or _LOCAL_REGION, is_secure=False,
                       wait_time_seconds=1, polling_interval=0.1)
    elif region:
        options["region"] = region
    return options


def sqs_dead_letter_queue_name(queue_name: str) -> str:
    """The SQS dead-letter queue recovery gives the SQS queue ``queue_name`` (the name as
    SQS knows it, after kombu's prefix and character translation)."""
    fifo = queue_name.endswith(".fifo")
    base = queue_name[:-len(".fifo")] if fifo else queue_name
    tail = SQS_DEAD_LETTER_SUFFIX + (".fifo" if fifo else "")
    return base[:_SQS_NAME_MAX - len(tail)] + tail


def sqs_redrive_policy(dead_letter_queue_arn: str) -> str:
    """The ``RedrivePolicy`` attribute of a task queue: SQS moves a message received
    ``BROKER_DELIVERY_LIMIT`` times to the dead-letter queue (the second line of defence,
    as RabbitMQ's delivery limit: recovery's own cap, ``MAX_DELIVERIES``, comes first)."""
    return json.dumps({"deadLetterTargetArn": dead_letter_queue_arn,
                       "maxReceiveCount": str(delivery_limit())})


def _virtual_transport(app_conf: Any) -> None:
    options = dict(app_conf.broker_transport_options or {})
    options.setdefault("visibility_timeout", float(conf.get("VISIBILITY_TIMEOUT_SECONDS")))
    # Scan for stranded messages every 10 s instead of kombu's ~100 s.
    options.setdefault("unacked_restore_interval", 10)
    options.setdefault("unacked_restore_throttle", 1)
    app_conf.broker_transport_options = options


#: What recovery sets on RabbitMQ where the project kept Celery's default
#: (:data:`_CELERY_DEFAULTS`): quorum queues on topic exchanges, which Celery's native
#: delayed delivery needs.
_RABBITMQ_DEFAULTS = {
    "task_default_queue_type": "quorum",
    "task_default_exchange_type": "topic",
    "task_create_missing_queue_type": "quorum",
    "task_create_missing_queue_exchange_type": "topic",
}
_CELERY_DEFAULTS = {
    "task_default_queue_type": "classic",
    "task_default_exchange_type": "direct",
    "task_create_missing_queue_type": "classic",
    "task_create_missing_queue_exchange_type": None,
}


def _rabbitmq(app_conf: Any) -> None:
    options = dict(app_conf.broker_transport_options or {})
    options.setdefault("confirm_publish", True)
    app_conf.broker_transport_options = options
    if app_conf.task_queues:
        return  # the project's own queues (recovery.W020 checks them)
    # Celery's defaults give way; a value the project chose stays (a fanout exchange, say).
    for name, value in _RABBITMQ_DEFAULTS.items():
        if app_conf.get(name) == _CELERY_DEFAULTS[name]:
            app_conf[name] = value
    exchange = Exchange(app_conf.task_default_exchange or app_conf.task_default_queue,
                        type=app_conf.task_default_exchange_type, durable=True)
    app_conf.update(
        task_queues=(Queue(app_conf.task_default_queue, exchange,
                           routing_key=app_conf.task_default_routing_key
                           or app_conf.task_default_queue,
                           durable=True, queue_arguments=quorum_queue_arguments()),),
    )


def missing_protection(queues: Mapping[str, Queue] | Any) -> list[str]:
    """Names of the project's RabbitMQ queues that RabbitMQ would let loop forever (no
    delivery limit or no dead-letter exchange): for the system check."""
    names = []
    for queue in (queues.values() if isinstance(queues, Mapping) else queues or ()):
        arguments = queue.queue_arguments or {}
        if not arguments.get("x-delivery-limit") or not arguments.get("x-dead-letter-exchange"):
            names.append(queue.name)
    return names


class ProtectedQueues(Queues):
    """Celery's queue map, whose queues created on demand (a task routed to a queue no one
    declared: ``apply_async(queue="reports")``, a ``task_routes`` destination, ``-Q``) get
    the delivery limit and dead-letter exchange of the declared ones when they are quorum
    queues. Celery gives them only ``x-queue-type``, and RabbitMQ would let a task that
    kills its worker loop there forever when recovery's own cap cannot act."""

    def new_missing(self, name: str) -> Queue:
        queue = super().new_missing(name)
        arguments = queue.queue_arguments or {}
        if arguments.get("x-queue-type") == "quorum":
            queue.queue_arguments = {**quorum_queue_arguments(), **arguments}
        return queue


class ProtectedAMQP(CeleryAMQP):
    """Celery's AMQP helper with :class:`ProtectedQueues` (installed by
    ``recovery.setup`` unless the project brought an AMQP class of its own)."""

    queues_cls = ProtectedQueues
