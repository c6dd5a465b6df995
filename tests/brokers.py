"""The broker matrix: which broker the suite runs on, and how a test empties it.

``make test`` runs the whole suite on Redis, then the integration suite on RabbitMQ
(TEST_BROKER_URL=amqp://…/celery_recovery_test) and on Amazon SQS (TEST_BROKER_URL=sqs://moto:
moto's server mode on a free loopback port, started by the test session; any other
sqs:// URL is used as it is). A test that cannot hold on a broker says why with
``@only_on("redis", reason=…)``: it is reported as skipped with that reason on the
others, never silently. An integration test whose subject has nothing to do with the
broker (an e-mail, a webhook, metrics exposition, database connections) is marked
``broker_independent``: the Makefile runs it in the Redis run only, to keep the matrix
within its time.
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

__all__ = ["BROKER", "MOTO", "only_on", "broker_independent", "empty_broker", "queues_of_the_runtime",
           "free_sqs_url", "moto_server", "sqs_client", "sqs_messages", "unacknowledged",
           "lose_queue", "queued", "broker_address", "via", "transport_options",
           "unreachable"]

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


#: Marks an integration test whose subject does not depend on the broker (see above).
broker_independent = pytest.mark.broker_independent


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


def _sqs_counts(url: str, queue: str) -> dict[str, int]:
    """An SQS queue's approximate counts (``ApproximateNumberOf…`` without the prefix);
    ``{}`` when the queue does not exist."""
    prefix = "ApproximateNumberOf"
    with sqs_client(url) as client:
        try:
            queue_url = client.get_queue_url(QueueName=queue)["QueueUrl"]
        except client.exceptions.QueueDoesNotExist:
            return {}
        attributes = client.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=[f"{prefix}Messages",
                                                f"{prefix}MessagesNotVisible"])["Attributes"]
    return {name[len(prefix):]: int(value) for name, value in attributes.items()}


# -- looking into the broker, whichever it is ---------------------------------------------


def _url() -> str:
    from django.conf import settings

    return settings.CELERY_BROKER_URL


def _vhost(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def unacknowledged(store, queue: str = "celery") -> int:
    """Messages delivered to a worker and not acknowledged yet (Redis: the transport's
    ``unacked`` hash; RabbitMQ: the queue's count, from rabbitmqctl; SQS: the queue's
    messages in flight)."""
    if BROKER == "sqs":
        return _sqs_counts(_url(), queue).get("MessagesNotVisible", 0)
    if BROKER != "amqp":
        return store.hlen("unacked")
    import subprocess

    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", _vhost(_url()), "name",
                          "messages_unacknowledged"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return 0


def lose_queue(store, queue: str = "celery") -> int:
    """The broker loses every message waiting in ``queue``; returns how many there were
    (Redis: 1 when the list existed)."""
    if BROKER == "sqs":
        waiting = _sqs_counts(_url(), queue).get("Messages", 0)
        with sqs_client(_url()) as client:
            client.purge_queue(QueueUrl=client.get_queue_url(QueueName=queue)["QueueUrl"])
        return waiting
    if BROKER != "amqp":
        return store.delete(queue)
    with Connection(_url(), connect_timeout=5) as connection:
        channel = connection.channel()
        try:
            return channel.queue_purge(queue) or 0
        finally:
            channel.close()


def queued(store, queue: str = "celery", delayed: bool = False) -> list[dict]:
    """The messages waiting in ``queue`` (and, on RabbitMQ with ``delayed``, in the
    delayed-delivery queues), as ``{"headers": …}`` dicts, left where they are (on SQS:
    hidden for 30 s, as :func:`sqs_messages` receives them)."""
    import json

    if BROKER == "sqs":
        return sqs_messages(_url(), queue)
    if BROKER != "amqp":
        return [json.loads(raw) for raw in store.lrange(queue, 0, -1)]
    names = [queue, *(f"celery_delayed_{level}" for level in range(28) if delayed)]
    found = []
    with Connection(_url(), connect_timeout=5) as connection:
        for name in names:
            channel = connection.channel()
            try:
                while True:
                    message = channel.basic_get(name, no_ack=False)
                    if message is None:
                        break
                    found.append({"headers": dict(message.headers or {}),
                                  "properties": dict(message.properties or {})})
            except Exception:  # noqa: BLE001 - a delay level nobody declared
                pass
            finally:
                try:
                    channel.close()  # gives back what basic_get took, unacknowledged
                except Exception:  # noqa: BLE001
                    pass
    return found


def broker_address() -> tuple[str, int]:
    """Host and port of the test broker."""
    from urllib.parse import urlsplit

    parts = urlsplit(_url())
    return parts.hostname or "127.0.0.1", parts.port or (5672 if BROKER == "amqp" else 6379)


def via(port: int) -> str:
    """The test broker's URL through a proxy listening on ``port``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(_url())
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


def transport_options(url: str) -> dict:
    """The transport options a Celery app without ``recovery.setup`` needs to reach the
    test broker at ``url`` (SQS: the local server's, :func:`topology.sqs_transport_options`)."""
    return topology.sqs_transport_options(url) if topology.broker_kind(url) == topology.SQS else {}


def unreachable() -> str:
    """A URL that nothing answers: of the test broker's kind on RabbitMQ, else Redis's
    (an SQS client retries a refused connection for seconds before it gives up)."""
    return "amqp://guest:guest@127.0.0.1:1//" if BROKER == "amqp" else "redis://127.0.0.1:1/0"
