"""A broker that restarts under a worker holding messages (its own redis-server, with
persistence on, or its own RabbitMQ node, so restarting it disturbs no other test)."""

from __future__ import annotations

import redis
from kombu import Connection
from celery import states

from recovery.models import DeadLetter

from tests.chaos.services import RabbitMQNode, RedisServer

from ..brokers import only_on
from . import worker_tasks as t
from .harness import wait_for
from .test_retry_and_park import result_state, runs


@only_on("redis", reason="restarts a Redis server of its own, which is its broker whatever the "
                          "matrix runs on")
def test_worker_holding_messages_survives_a_redis_restart_and_finishes_them(
        start_worker, worker_env, tmp_path, key):
    # Given a private Redis with append-only persistence, and a worker on it that holds
    # messages: two running (acks_late, unacknowledged) and more prefetched behind them
    server = RedisServer(tmp_path).start()
    try:
        worker = start_worker("w1", env={"CELERY_BROKER_URL": server.url})
        client = redis.Redis.from_url(server.url)
        with Connection(server.url) as conn:
            ids = [t.long_running.apply_async((f"{key}-{n}", 3.0), connection=conn).id
                   for n in range(6)]
        wait_for(lambda: client.hlen("unacked") >= 4, 30, message="messages held by the worker")
        # When Redis shuts down and comes back on the same files while they are held
        server.restart()
        # Then the worker is still running after the consumer noticed the lost connection
        wait_for(lambda: "Connection to broker lost" in worker.log(), 30,
                 message="the worker to notice the restart")
        wait_for(lambda: "Connected to redis://" in worker.log().rsplit(
            "Connection to broker lost", 1)[-1], 60, message="the worker to reconnect")
        assert worker.process.poll() is None, worker.log()[-3000:]
        assert "Unrecoverable error" not in worker.log()
        # ... and every task ends SUCCESS (the held ones after the visibility timeout), none
        # parked
        wait_for(lambda: all(result_state(task_id) == states.SUCCESS for task_id in ids), 90,
                 message="all six tasks to succeed")
        assert not DeadLetter.objects.filter(task_id__in=ids).exists()
        assert worker.process.poll() is None
        worker.stop()
    finally:
        server.stop()


@only_on("amqp", reason="restarts a RabbitMQ node of its own, which is its broker whatever "
                        "the matrix runs on")
def test_worker_holding_messages_survives_a_rabbitmq_restart_and_finishes_them(
        start_worker, store, tmp_path, key):
    # Given a private RabbitMQ node, and a worker on it running two tasks with more held
    node = RabbitMQNode().start()
    try:
        worker = start_worker("w1", env={"CELERY_BROKER_URL": node.url})
        with Connection(node.url) as conn:
            ids = [t.long_running.apply_async((f"{key}-{n}", 3.0), connection=conn).id
                   for n in range(6)]
        wait_for(lambda: sum(runs(store, f"{key}-{n}") for n in range(6)) >= 2, 30,
                 message="two tasks running")
        # When the node stops and starts again on its data while they run
        node.restart()
        # Then the worker reconnects and is still running
        wait_for(lambda: "Connection to broker lost" in worker.log(), 30,
                 message="the worker to notice the restart")
        wait_for(lambda: "Connected to amqp://" in worker.log().rsplit(
            "Connection to broker lost", 1)[-1], 90, message="the worker to reconnect")
        assert worker.process.poll() is None, worker.log()[-3000:]
        assert "Unrecoverable error" not in worker.log()
        # ... and every task ends SUCCESS, none parked (RabbitMQ gave the unacknowledged
        # ones back when the connection dropped; at least once, so some ran twice)
        wait_for(lambda: all(result_state(task_id) == states.SUCCESS for task_id in ids), 120,
                 message="all six tasks to succeed")
        assert not DeadLetter.objects.filter(task_id__in=ids).exists()
        assert all(runs(store, f"{key}-{n}") >= 1 for n in range(6))
        assert worker.process.poll() is None
        worker.stop()
    finally:
        node.stop()
