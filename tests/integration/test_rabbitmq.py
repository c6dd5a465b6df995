"""What only RabbitMQ has: quorum queues with a delivery limit, its dead-letter exchange
drained into the DeadLetter table, and native delayed delivery for retries."""

from __future__ import annotations

import time

from kombu import Connection, Exchange

from config.celery import app
from recovery.delivery import topology
from recovery.models import DeadLetter

from ..brokers import empty_broker, only_on
from . import worker_tasks as t
from .harness import wait_for
from .test_retry_and_park import runs, times

pytestmark = only_on("amqp", reason="RabbitMQ's own delivery limit, dead-letter exchange "
                                    "and delayed-delivery exchanges")


def _queue_depth(name: str) -> int:
    with Connection(app.conf.broker_url) as connection:
        channel = connection.channel()
        try:
            return channel.queue_declare(name, passive=True).message_count
        finally:
            channel.close()


def _queue_depth_or_none(name: str) -> int | None:
    """The depth of ``name``, or None if no one declared it."""
    from amqp.exceptions import NotFound

    try:
        return _queue_depth(name)
    except NotFound:
        return None


def _delete_queue(name: str) -> None:
    with Connection(app.conf.broker_url) as connection:
        channel = connection.channel()
        channel.queue_delete(name)
        channel.exchange_delete(name)
        channel.close()


def test_the_task_queue_is_a_delivery_limited_quorum_queue_that_dead_letters(start_worker):
    start_worker()
    with Connection(app.conf.broker_url) as connection:
        channel = connection.channel()
        # Passive redeclaration with other arguments would fail: declaring it again with
        # exactly the runtime's arguments proves what the worker declared.
        queue = app.amqp.queues["celery"]
        assert queue.queue_arguments == topology.quorum_queue_arguments()
        queue.bind(channel).declare()
        channel.close()
    assert topology.quorum_queue_arguments()["x-delivery-limit"] == 20


def test_a_crash_loop_past_the_brokers_delivery_limit_becomes_a_poison_letter(start_worker,
                                                                              store, key):
    """recovery's own cap is out of reach (50 deliveries): RabbitMQ's limit (2) stops the
    loop, dead-letters the message, and a worker parks it with RabbitMQ's account."""
    queue = f"limit-{key}"
    try:
        start_worker(env={"TEST_TASK_QUEUE": queue, "RECOVERY_MAX_DELIVERIES": "50",
                          "RECOVERY_BROKER_DELIVERY_LIMIT": "2"})
        result = t.kills_its_worker.apply_async(
            (key,), exchange=Exchange(queue, type="topic"), routing_key=queue)
        letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 90,
                          message="the dead-lettered message parked")

        assert runs(store, key) == 3, "a limit of 2 lets the first delivery and 2 more run"
        assert letter.kind == "poison"
        assert letter.task_name == "tests.integration.worker_tasks.kills_its_worker"
        assert letter.args == [key]
        assert "delivery limit" in letter.reason and queue in letter.reason
        death = letter.history[-1]["broker_death"]
        assert death["reason"] == "delivery_limit"
        assert death["queue"] == queue
        assert letter.headers["x-death"][0]["reason"] == "delivery_limit"
        # Acknowledged once parked: nothing left in either queue, and it does not run again.
        wait_for(lambda: _queue_depth(topology.DEAD_LETTER_QUEUE) == 0, 10,
                 message="the dead-letter queue drained")
        assert _queue_depth(queue) == 0
        time.sleep(2)
        assert runs(store, key) == 3
        assert DeadLetter.objects.filter(task_id=result.id).count() == 1
    finally:
        empty_broker(app.conf.broker_url, extra=(queue,))
        _delete_queue(queue)


def test_a_message_dead_lettered_while_no_worker_runs_is_parked_when_one_starts(start_worker,
                                                                              store, key):
    """The letter lives in RabbitMQ only until a worker is there to take it: a message
    already in recovery.dead_letters when the worker starts is parked, once."""
    from kombu import Producer

    with Connection(app.conf.broker_url) as connection:
        channel = connection.channel()
        dead = topology.dead_letter_queue()
        dead.bind(channel).declare()
        Producer(channel).publish(
            [[key], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            exchange=dead.exchange, routing_key="celery", serializer="json",
            headers={"id": f"dlx-{key}", "task": "tests.integration.worker_tasks.flaky_twice",
                     "x-death": [{"reason": "delivery_limit", "queue": "celery", "count": 1,
                                  "exchange": "celery", "routing-keys": ["celery"]}],
                     "x-delivery-count": 21})
        channel.close()

    start_worker()
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=f"dlx-{key}").first(), 30,
                      message="the waiting dead letter parked")
    assert letter.kind == "poison"
    assert letter.args == [key]
    assert letter.history[-1]["attempt"] == 22
    assert "after 21 deliveries from queue celery" in letter.reason
    wait_for(lambda: _queue_depth(topology.DEAD_LETTER_QUEUE) == 0, 10,
             message="the dead-letter queue drained")
    assert runs(store, key) == 0, "a dead-lettered task is parked, not run"


def test_a_sub_second_backoff_is_carried_by_native_delayed_delivery_as_one_second(
        start_worker, store, key):
    """Celery refuses native countdowns under a second; recovery rounds them up, so the
    backoff of 0.2 s, 0.4 s… publishes, and each retry waits at least its backoff."""
    start_worker()
    result = t.flaky_twice.delay(key)
    assert result.get(timeout=60) == 3
    gaps = [b - a for a, b in zip(times(store, key), times(store, key)[1:])]
    assert len(gaps) == 2 and all(gap >= 0.9 for gap in gaps), gaps
    assert not DeadLetter.objects.filter(task_id=result.id).exists()


def test_messages_held_and_handed_back_on_clean_shutdowns_are_not_counted_as_losses(
        start_worker, store, key):
    """RabbitMQ gives back what a stopped worker held unstarted marked redelivered, as it
    does for a dead worker's: the worker says which it never started (its own request
    state, read before Celery forgets it), so a few deploys never add up to the cap."""
    import signal
    import socket
    import uuid
    from datetime import datetime, timedelta, timezone

    from .test_worker_failures import _held_by, publish_raw, task_body

    # Messages with an ETA a client sent straight to the queue (not through delayed
    # delivery): each worker holds them in its memory until then, unstarted.
    eta = (datetime.now(timezone.utc) + timedelta(seconds=45)).isoformat()
    held = [str(uuid.uuid4()) for _ in range(2)]
    for n, task_id in enumerate(held):
        publish_raw(task_body(f"{key}-h{n}", 0), t.long_running.name, task_id, eta=eta,
                    expires=(datetime.now(timezone.utc) + timedelta(seconds=900)).isoformat())
    cap = 3  # MAX_DELIVERIES in the test settings
    for deploy in range(cap + 1):
        worker = start_worker(f"deploy{deploy}", concurrency=1)
        name = f"deploy{deploy}@{socket.gethostname()}"
        states = wait_for(lambda: len(found := _held_by(name, held)) == 2 and found, 30,
                          message="the worker to hold the two messages")
        assert set(states.values()) == {"scheduled"}
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=30) == 0
        assert "2 message(s) handed back unused" in worker.log()
        assert not DeadLetter.objects.exists(), worker.log()[-3000:]
    start_worker("after")
    wait_for(lambda: [runs(store, f"{key}-h{n}") for n in range(2)] == [1, 1], 90,
             message="both to run once their ETA came")
    assert not DeadLetter.objects.exists()


def test_a_retry_of_a_task_sent_to_another_queue_comes_back_to_it_and_it_is_protected(start_worker,
                                                                          store, key):
    """A retry through native delayed delivery lands in the queue its task was sent to,
    not in the default queue: a worker that consumes only that queue runs every attempt."""
    queue = f"routed-{key}"
    try:
        start_worker(extra=("-Q", queue))
        result = t.flaky_twice.apply_async((key,), queue=queue)
        assert result.get(timeout=60) == 3
        assert runs(store, key) == 3
        assert _queue_depth_or_none("celery") in (0, None), "no attempt in the default queue"
        # And the queue no one declared got the declared queues' delivery limit: declaring
        # it again with exactly those arguments succeeds only if the worker did too.
        routed = app.amqp.queues[queue]
        assert routed.queue_arguments == topology.quorum_queue_arguments()
        with Connection(app.conf.broker_url) as connection:
            channel = connection.channel()
            routed.bind(channel).declare()
            channel.close()
    finally:
        _delete_queue(queue)
