"""What only SQS has: its own redrive (RedrivePolicy, maxReceiveCount) drained into the
DeadLetter table, on real workers against moto's SQS server (TEST_BROKER_URL=sqs://moto)."""

from __future__ import annotations

import json
import signal
import time

from celery import Celery
from kombu import Connection

from config.celery import app
from recovery.delivery import topology
from recovery.models import DeadLetter

from ..brokers import only_on, sqs_client
from . import worker_tasks as t
from .harness import wait_for
from .test_retry_and_park import runs

pytestmark = only_on("sqs", reason="SQS's own redrive policy, dead-letter queues and receive "
                                    "counts")


def _url(client, name: str) -> str | None:
    try:
        return client.get_queue_url(QueueName=name)["QueueUrl"]
    except client.exceptions.QueueDoesNotExist:
        return None


def _policy(name: str) -> dict:
    with sqs_client(app.conf.broker_url) as client:
        url = _url(client, name)
        if url is None:
            return {}
        attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
        return json.loads(attributes.get("Attributes", {}).get("RedrivePolicy") or "{}")


def _depth(name: str) -> int:
    with sqs_client(app.conf.broker_url) as client:
        attributes = client.get_queue_attributes(QueueUrl=_url(client, name), AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        return sum(int(value) for value in attributes["Attributes"].values())


def _delete(*names: str) -> None:
    with sqs_client(app.conf.broker_url) as client:
        for name in names:
            url = _url(client, name)
            if url is not None:
                client.delete_queue(QueueUrl=url)


def _send_task(name: str, args: list, task_id: str, queue: str) -> None:
    """Publish as Celery does, on a connection of its own (the test process's producer
    pool caches queue URLs, and these queues are deleted after the test)."""
    url = app.conf.broker_url
    with Connection(url, transport_options=topology.sqs_transport_options(url)) as conn:
        Celery("sqs-publisher", set_as_current=False).send_task(
            name, args=args, task_id=task_id, queue=queue, connection=conn)


def test_the_task_queue_gets_a_dead_letter_queue_at_the_delivery_limit(start_worker):
    # Given a worker on SQS with the topology "auto"
    start_worker()
    # Then its task queue dead-letters into celery-dead-letters after BROKER_DELIVERY_LIMIT
    policy = wait_for(lambda: _policy("celery"), 30, message="the redrive policy")
    assert policy["deadLetterTargetArn"].endswith(":celery-dead-letters")
    assert int(policy["maxReceiveCount"]) == topology.delivery_limit() == 20


def test_a_crash_loop_past_max_receive_count_is_redriven_and_becomes_a_poison_letter(
        start_worker, store, key):
    """recovery's own cap is out of reach (50 deliveries): SQS's maxReceiveCount (2) stops
    the loop, moves the message to the dead-letter queue, and a worker parks it."""
    queue = f"limit-{key}"
    dead = topology.sqs_dead_letter_queue_name(queue)
    try:
        # Given a worker whose queue SQS redrives after two receives
        start_worker(env={"TEST_TASK_QUEUE": queue, "RECOVERY_MAX_DELIVERIES": "50",
                          "RECOVERY_BROKER_DELIVERY_LIMIT": "2"})
        wait_for(lambda: _policy(queue), 30, message="the redrive policy")
        # When a task kills its pool child on every run
        task_id = f"loop-{key}"
        _send_task(t.kills_its_worker.name, [key], task_id, queue)
        # Then SQS moves it to the dead-letter queue after two runs, and it is parked
        letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 90,
                          message="the redriven message parked")
        assert runs(store, key) == 2, "a maxReceiveCount of 2 lets two receives run"
        assert letter.kind == "poison"
        assert letter.task_name == t.kills_its_worker.name
        assert letter.args == [key]
        assert "SQS redrive" in letter.reason and queue in letter.reason
        assert "maxReceiveCount 2" in letter.reason
        entry = letter.history[-1]
        assert entry["attempt"] == 3, "SQS's receive count: two runs, and the drain's receive"
        assert entry["broker_death"]["reason"] == "sqs_redrive"
        assert entry["broker_death"]["queue"] == queue
        # Deleted once parked: nothing left in either queue, and it does not run again.
        wait_for(lambda: _depth(dead) == 0, 10, message="the dead-letter queue drained")
        assert _depth(queue) == 0
        time.sleep(2)
        assert runs(store, key) == 2
        assert DeadLetter.objects.filter(task_id=task_id).count() == 1
    finally:
        _delete(queue, dead)


def test_a_message_waiting_in_the_dead_letter_queue_is_parked_once_when_a_worker_starts(
        start_worker, store, key):
    """The letter lives in SQS only until a worker is there to take it."""
    # Given a message already in celery's dead-letter queue, and no worker
    _send_task(t.flaky_twice.name, [key], f"dlq-{key}", "celery-dead-letters")
    # When a worker starts
    start_worker()
    # Then it parks it, once, unrun, and deletes it from SQS
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=f"dlq-{key}").first(), 30,
                      message="the waiting dead letter parked")
    assert letter.kind == "poison"
    assert letter.args == [key]
    assert letter.history[-1]["attempt"] == 1
    assert "celery-dead-letters" in letter.reason
    wait_for(lambda: _depth("celery-dead-letters") == 0, 10, message="the dead-letter queue drained")
    time.sleep(3)
    assert DeadLetter.objects.filter(task_id=f"dlq-{key}").count() == 1
    assert len(DeadLetter.objects.get(task_id=f"dlq-{key}").history) == 1
    assert runs(store, key) == 0, "a dead-lettered task is parked, not run"


def test_messages_handed_back_on_clean_shutdowns_are_not_counted_as_losses(start_worker, store,
                                                                          key):
    """SQS counts every receive (ApproximateReceiveCount), a clean shutdown's hand-back
    included: those receives must not count towards MAX_DELIVERIES. (The broker-neutral
    test asks the worker what it holds over remote control, which SQS does not carry;
    here the worker's log says what it received.)"""
    from recovery.store.models import DeliveryCount

    # Given countdown (ETA) messages, which a worker holds in memory until they are due,
    # sent with `expires` (so every receipt is checked against the delivery cap)
    held = [t.long_running.apply_async((f"{key}-{n}", 0), countdown=600, expires=900).id
            for n in range(3)]
    cap = 3  # MAX_DELIVERIES in the test settings

    def received_all(worker) -> bool:
        log = worker.log()
        return all(f"[{task_id}] received" in log for task_id in held)

    # When a worker receives them and is stopped cleanly (SIGTERM: warm shutdown) while it
    # holds them, MAX_DELIVERIES + 1 times in a row (a few deploys)
    for deploy in range(cap + 1):
        worker = start_worker(f"deploy{deploy}", concurrency=1)
        wait_for(lambda: received_all(worker) or DeadLetter.objects.exists(), 30,
                 message="the worker to hold the three messages")
        assert not DeadLetter.objects.exists(), worker.log()[-3000:]
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=30) == 0
        assert "Restoring 3 unacknowledged message(s)" in worker.log()
        assert "3 message(s) handed back unused" in worker.log()
        # Then no delivery is left counted against them
        assert not DeliveryCount.objects.filter(task_id__in=held, deliveries__gt=0).exists()
    # And the next worker receives them again without parking any
    after = start_worker("after")
    wait_for(lambda: received_all(after), 30, message="the next worker to hold them")
    time.sleep(2)
    assert not DeadLetter.objects.exists(), after.log()[-3000:]
    assert [runs(store, f"{key}-{n}") for n in range(3)] == [0, 0, 0]
