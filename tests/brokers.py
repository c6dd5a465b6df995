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
