"""recovery.delivery.visibility on kombu's real Redis transport, against the test Redis, and
on its real SQS transport, against moto's SQS server."""

from __future__ import annotations

import os
import time
import uuid
from importlib.metadata import version
from types import SimpleNamespace

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from config.celery import app as celery_app
from recovery.delivery.housekeeping import Housekeeping
from recovery.delivery.visibility import extend_held_messages, missing_internals


def _holding_one(url: str, transport_options: dict | None = None):
    """A real kombu consumer on ``url`` holding one unacknowledged message of a queue of
    its own: yields (a consumer as the extension sees it, the channel, the message)."""
    name = f"visibility-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(url, transport_options=transport_options or {}) as conn:
        channel = conn.channel()
        Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=name,
                                  declare=[queue])
        received = []
        consumer = Consumer(channel, [queue], callbacks=[lambda body, msg: received.append(msg)])
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=5)
            assert len(received) == 1
            yield SimpleNamespace(task_consumer=consumer, app=celery_app), channel, received[0]
            if not received[0].acknowledged:
                received[0].ack()
        channel.close()


@pytest.fixture
def holding():
    """A real kombu consumer on the test Redis holding one unacknowledged message."""
    yield from _holding_one(os.environ.get("TEST_BROKER_URL", celery_app.conf.broker_url))


def test_the_real_redis_channel_has_every_internal_the_extension_uses(holding):
    _, channel, _ = holding
    assert isinstance(channel, kombu_redis.Channel)
    assert missing_internals(channel) is None
    Housekeeping.require_internals(holding[0])


def test_a_held_message_has_its_delivery_time_refreshed(holding):
    consumer, channel, message = holding
    tag = message.delivery_tag
    with channel.conn_or_acquire() as client:
        client.zadd(channel.unacked_index_key, {tag: time.time() - 1000})
        before = time.time()
        assert extend_held_messages(consumer) >= 1
        assert client.zscore(channel.unacked_index_key, tag) >= before


def test_an_acknowledged_message_is_never_brought_back(holding):
    consumer, channel, message = holding
    message.ack()
    with channel.conn_or_acquire() as client:
        extend_held_messages(consumer)
        assert client.zscore(channel.unacked_index_key, message.delivery_tag) is None


def test_without_kombus_internals_the_extension_fails_loudly_and_the_worker_refuses_to_start(
        holding, monkeypatch):
    consumer, _, _ = holding
    monkeypatch.delattr(kombu_redis.Channel, "unacked_index_key")
    with pytest.raises(RuntimeError, match=f"kombu {version('kombu')} has no "
                                           "Channel.unacked_index_key"):
        extend_held_messages(consumer)
    with pytest.raises(RuntimeError, match="celery-recovery cannot run on this worker"):
        Housekeeping.require_internals(consumer)


def test_without_django_celery_results_internals_the_worker_refuses_to_start(holding,
                                                                              monkeypatch):
    from django_celery_results.backends.database import DatabaseBackend

    monkeypatch.delattr(DatabaseBackend, "_get_extended_properties")
    with pytest.raises(RuntimeError, match=f"django-celery-results "
                                           f"{version('django-celery-results')} has no "
                                           "DatabaseBackend._get_extended_properties"):
        Housekeeping.require_internals(holding[0])


@pytest.fixture
def holding_on_sqs(sqs_url):
    """A real kombu consumer on moto's SQS server holding one unacknowledged message of a
    queue whose visibility timeout is 2 s."""
    from recovery.delivery import topology

    yield from _holding_one(sqs_url, {**topology.sqs_transport_options(sqs_url),
                                      "visibility_timeout": 2})


def _sqs_counts(channel, message) -> tuple[int, int]:
    """(visible, in flight) of the held message's queue."""
    attributes = channel.sqs().get_queue_attributes(
        QueueUrl=message.delivery_info["sqs_queue"],
        AttributeNames=["ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return (int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]))


def test_the_real_sqs_channel_has_every_internal_the_extension_uses(holding_on_sqs):
    consumer, channel, _ = holding_on_sqs
    assert missing_internals(channel) is None
    assert missing_internals(type(channel)) is None
    Housekeeping.require_internals(consumer)


def test_a_message_held_on_sqs_stays_invisible_past_its_visibility_timeout(holding_on_sqs):
    # Given a message held for 1.5 s of its 2 s lease
    consumer, channel, message = holding_on_sqs
    time.sleep(1.5)
    # When the worker extends what it holds
    assert extend_held_messages(consumer) == 1
    # Then SQS still hides it past the end of its first lease
    time.sleep(1.5)
    assert _sqs_counts(channel, message) == (0, 1)


def test_an_acknowledged_sqs_message_is_not_extended(holding_on_sqs):
    consumer, channel, message = holding_on_sqs
    message.ack()
    assert extend_held_messages(consumer) == 0
    assert _sqs_counts(channel, message) == (0, 0)
