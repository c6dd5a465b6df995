"""The broker matrix: which broker the suite runs on, and how a test empties it.

``make test`` runs the whole suite on Redis, then the integration suite on RabbitMQ
(TEST_BROKER_URL=amqp://…/celery_recovery_test). A test that cannot hold on a broker says
why with ``@only_on("redis", reason=…)``: it is reported as skipped with that reason on
the others, never silently.
"""

from __future__ import annotations

import os

import pytest
from kombu import Connection
from kombu.exceptions import OperationalError

from recovery.delivery import topology

__all__ = ["BROKER", "only_on", "empty_broker", "queues_of_the_runtime"]

BROKER = topology.broker_kind(os.environ.get("TEST_BROKER_URL", "redis://"))


def only_on(*kinds: str, reason: str):
    """Mark a test that holds on ``kinds`` of broker only, with the reason."""
    return pytest.mark.skipif(BROKER not in kinds,
                              reason=f"{BROKER}: {reason} (holds on {', '.join(kinds)} only)")


def queues_of_the_runtime() -> list[str]:
    """The queues a worker of the test settings declares on RabbitMQ."""
    return ["celery", topology.DEAD_LETTER_QUEUE, *(f"celery_delayed_{level}" for level in range(28))]


def empty_broker(url: str, extra: tuple[str, ...] = ()) -> None:
    """Purge the runtime's queues (and ``extra``) on RabbitMQ; Redis is flushed by its
    client. A queue that does not exist yet is fine."""
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
    ``unacked`` hash; RabbitMQ: the queue's count, from rabbitmqctl)."""
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
    delayed-delivery queues), as ``{"headers": …}`` dicts, left where they are."""
    import json

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


def unreachable() -> str:
    """A URL of the test broker's kind that nothing answers."""
    return "amqp://guest:guest@127.0.0.1:1//" if BROKER == "amqp" else "redis://127.0.0.1:1/0"
