"""The broker matrix: which broker the suite runs on, and how a test empties it.

``make test`` runs the whole suite on Redis, then the integration suite on RabbitMQ
(TEST_BROKER_URL=amqp://…/celery_recovery_test) and on Amazon SQS (TEST_BROKER_URL=sqs://moto:
moto's server mode on a free loopback port, started by the test session; any other
sqs:// URL is used as it is). A test that cannot hold on a broker says why with
``@only_on("redis", reason=…)``: it is reported as skipped with that reason on the
others, never silently.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

import pytest
from kombu import Connection
from kombu.exceptions import OperationalError

from recovery.delivery import topology

__all__ = ["BROKER", "MOTO", "only_on", "empty_broker", "queues_of_the_runtime",
           "free_sqs_url", "moto_server", "sqs_client", "sqs_messages", "proxied",
           "broker_port"]

BROKER = topology.broker_kind(os.environ.get("TEST_BROKER_URL", "redis://"))
#: TEST_BROKER_URL's sentinel for "moto's SQS server, started by the tests".
MOTO = "sqs://moto"


def free_sqs_url() -> str:
    """An sqs:// URL on a free loopback port, for a moto server to start on."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"sqs://testing:testing@127.0.0.1:{port}"


@contextmanager
def moto_server(url: str) -> Iterator[str]:
    """moto's SQS server (``ThreadedMotoServer``) on the URL's loopback port (tests/settings.py
    reserved it for TEST_BROKER_URL=sqs://moto), shared by
    the test process and the worker subprocesses; stopped on exit."""
    from urllib.parse import urlsplit

    from moto.server import ThreadedMotoServer

    # AWS lets a queue be purged once a minute; the tests purge between every two tests
    # (empty_broker), and moto only follows AWS there when told to.
    os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=urlsplit(url).port, verbose=False)
    server.start()
    try:
        yield url
    finally:
        server.stop()


@contextmanager
def sqs_client(url: str) -> Iterator[object]:
    """A boto3 SQS client configured as the workers' (recovery.delivery.topology)."""
    with Connection(url, transport_options=topology.sqs_transport_options(url),
                    connect_timeout=5) as connection:
        yield connection.default_channel.sqs()


def only_on(*kinds: str, reason: str):
    """Mark a test that holds on ``kinds`` of broker only, with the reason."""
    return pytest.mark.skipif(BROKER not in kinds,
                              reason=f"{BROKER}: {reason} (holds on {', '.join(kinds)} only)")


def queues_of_the_runtime() -> list[str]:
    """The queues a worker of the test settings declares on RabbitMQ."""
    return ["celery", topology.DEAD_LETTER_QUEUE, *(f"celery_delayed_{level}" for level in range(28))]


def empty_broker(url: str, extra: tuple[str, ...] = ()) -> None:
    """Purge the runtime's queues (and ``extra``) on RabbitMQ, and every queue on SQS;
    Redis is flushed by its client. A queue that does not exist yet is fine."""
    if topology.broker_kind(url) == topology.SQS:
        with sqs_client(url) as client:
            for queue_url in client.list_queues().get("QueueUrls", []):
                try:
                    client.purge_queue(QueueUrl=queue_url)
                except client.exceptions.QueueDoesNotExist:
                    pass
        return
    if topology.broker_kind(url) != topology.AMQP:
        return
    with Connection(url, connect_timeout=5) as connection:
        for name in (*queues_of_the_runtime(), *extra):
            channel = connection.channel()
            try:
                channel.queue_purge(name)
            except OperationalError:
                raise
            except Exception:  # noqa: BLE001 - NOT_FOUND closes the channel: next one
                pass
            finally:
                try:
                    channel.close()
                except Exception:  # noqa: BLE001
                    pass


def sqs_messages(url: str, queue: str = "celery") -> list[dict]:
    """The kombu envelopes waiting in an SQS queue (as a Redis list holds them), decoded as
    the workers decode them; received once each and left hidden for 30 s."""
    from recovery.delivery.sqs_dead_letters import decode_sqs_body

    found: dict[str, dict] = {}
    with sqs_client(url) as client:
        try:
            queue_url = client.get_queue_url(QueueName=queue)["QueueUrl"]
        except client.exceptions.QueueDoesNotExist:
            return []
        while True:
            messages = client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                              VisibilityTimeout=30).get("Messages") or []
            if not messages:
                return list(found.values())
            for message in messages:
                found[message["MessageId"]] = decode_sqs_body(message["Body"])


def proxied(url: str, port: int) -> tuple[str, dict]:
    """The broker URL ``url`` as reached through a local proxy on ``port`` (the proxy
    forwards to the broker's own port: :func:`broker_port`), and the transport options
    a Celery app without ``recovery.setup`` needs for it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if topology.broker_kind(url) == topology.SQS:
        proxied_url = url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{port}")
        return proxied_url, topology.sqs_transport_options(proxied_url)
    return f"redis://127.0.0.1:{port}/{url.rsplit('/', 1)[1]}", {}


def broker_port(url: str) -> int:
    """The broker's port (Redis's 6379 when the URL names none)."""
    from urllib.parse import urlsplit

    return urlsplit(url).port or 6379
