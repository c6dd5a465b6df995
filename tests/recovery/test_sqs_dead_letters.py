"""recovery.delivery.sqs_dead_letters against moto's SQS server (tests/conftest.py:
``sqs_url``): the redrive a worker gives its queues, and the drain of their dead-letter
queues into real PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery import Celery
from kombu import Connection

from recovery.delivery import sqs_dead_letters, topology
from recovery.delivery.sqs_dead_letters import Redrive, decode_sqs_body
from recovery.models import DeadLetter


@pytest.fixture
def channel(sqs_url):
    with Connection(sqs_url, transport_options=topology.sqs_transport_options(sqs_url)) as conn:
        yield conn.default_channel


@pytest.fixture
def name():
    return f"unit-{uuid.uuid4().hex[:10]}"


def _publish(sqs_url: str, queue: str, task_id: str, args: list) -> None:
    """A task message exactly as Celery and kombu's SQS transport write it."""
    app = Celery("sqs-unit", broker=sqs_url, set_as_current=False)
    # The connection named: Celery prefers CELERY_BROKER_URL from the environment.
    with Connection(sqs_url, transport_options=topology.sqs_transport_options(sqs_url)) as conn:
        app.send_task("tests.integration.worker_tasks.flaky_twice", args=args,
                      task_id=task_id, queue=queue, connection=conn)


def _depth(client, url: str) -> int:
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return sum(int(value) for value in attributes.values())


def test_a_body_kombu_wrote_decodes_to_the_celery_message(sqs_url, channel, name):
    # Given a task message published through kombu's SQS transport (base64, kombu's default)
    _publish(sqs_url, name, "id-1", ["k", 42])
    client = channel.sqs()
    url = client.get_queue_url(QueueName=name)["QueueUrl"]
    raw = client.receive_message(QueueUrl=url)["Messages"][0]["Body"]
    # When the drain decodes the raw SQS body
    payload = decode_sqs_body(raw)
    # Then it has the Celery headers and the task's arguments
    assert payload["headers"]["id"] == "id-1"
    assert payload["headers"]["task"] == "tests.integration.worker_tasks.flaky_twice"
    args, kwargs, _embed = json.loads(sqs_dead_letters._celery_body(payload))
    assert args == ["k", 42] and kwargs == {}
    # A body kombu did not write decodes to nothing rather than failing
    assert decode_sqs_body("not json") == {}
    assert decode_sqs_body(b"\xff\xfe") == {}


def test_a_queue_without_redrive_gets_a_dead_letter_queue_at_the_delivery_limit(channel, name):
    # Given a task queue with no RedrivePolicy
    # When a worker sets its redrive up
    [source] = Redrive(channel, [name]).set_up()
    # Then the queue dead-letters into <name>-dead-letters after BROKER_DELIVERY_LIMIT receives
    client = channel.sqs()
    policy = json.loads(client.get_queue_attributes(
        QueueUrl=source.queue_url, AttributeNames=["RedrivePolicy"])["Attributes"]["RedrivePolicy"])
    assert policy["deadLetterTargetArn"].endswith(f":{name}-dead-letters")
    assert int(policy["maxReceiveCount"]) == topology.delivery_limit() == 20
    assert source.dead_letter_name == f"{name}-dead-letters"
    assert source.max_receive_count == 20
    # and a second worker finds it so, changing nothing
    assert Redrive(channel, [name]).set_up() == [source]


def test_a_queues_own_redrive_policy_is_kept_and_its_dead_letter_queue_drained(channel, name):
    client = channel.sqs()
    own = client.create_queue(QueueName=f"{name}-own")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=own, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    client.create_queue(QueueName=name, Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": arn, "maxReceiveCount": "7"})})

    [source] = Redrive(channel, [name]).set_up()

    assert source.dead_letter_name == f"{name}-own" and source.dead_letter_url == own
    assert source.max_receive_count == 7
    assert not [url for url in client.list_queues(QueueNamePrefix=name).get("QueueUrls", [])
                if url.endswith("-dead-letters")]


def test_with_the_topology_off_a_queue_gets_no_redrive(channel, name, settings):
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_TOPOLOGY": "off"}
    assert Redrive(channel, [name]).set_up() == []
    url = channel.sqs().get_queue_url(QueueName=name)["QueueUrl"]
    assert "RedrivePolicy" not in channel.sqs().get_queue_attributes(
        QueueUrl=url, AttributeNames=["All"])["Attributes"]


@pytest.mark.django_db
def test_a_redriven_message_is_parked_as_poison_then_deleted(sqs_url, channel, name):
    # Given a task queue with its redrive, and a message SQS moved to the dead-letter queue
    redrive = Redrive(channel, [name], hostname="w1@host")
    [source] = redrive.set_up()
    _publish(sqs_url, source.dead_letter_name, f"dead-{name}", [name])
    # When the worker drains it
    assert redrive.drain() == 1
    # Then it is one poison letter saying what SQS did, and gone from SQS
    letter = DeadLetter.objects.get(task_id=f"dead-{name}")
    assert letter.kind == "poison"
    assert letter.task_name == "tests.integration.worker_tasks.flaky_twice"
    assert letter.args == [name]
    assert letter.queue == name
    assert letter.worker == "w1@host"
    assert "SQS redrive" in letter.reason and source.dead_letter_name in letter.reason
    assert letter.history[-1]["attempt"] == 1
    assert letter.history[-1]["broker_death"]["reason"] == "sqs_redrive"
    assert letter.history[-1]["broker_death"]["queue"] == name
    assert _depth(channel.sqs(), source.dead_letter_url) == 0
    assert redrive.drain() == 0


@pytest.mark.django_db
def test_a_message_whose_parking_fails_stays_in_the_dead_letter_queue(sqs_url, channel, name,
                                                                      monkeypatch):
    redrive = Redrive(channel, [name])
    [source] = redrive.set_up()
    _publish(sqs_url, source.dead_letter_name, f"kept-{name}", [name])
    channel.sqs().set_queue_attributes(QueueUrl=source.dead_letter_url,
                                       Attributes={"VisibilityTimeout": "1"})

    def refuse(*args, **kwargs):
        raise OSError("database and spool both refused it")

    # When parking fails (the database and the spool both refuse the letter)
    monkeypatch.setattr(sqs_dead_letters, "park_poison", refuse)
    assert redrive.drain() == 0
    # Then the message is still in the dead-letter queue, and no letter claims it
    client = channel.sqs()
    assert _depth(client, source.dead_letter_url) == 1
    assert not DeadLetter.objects.filter(task_id=f"kept-{name}").exists()
    # and once parking works, its next receive (after the visibility timeout) parks it
    monkeypatch.undo()
    time.sleep(1.2)
    assert redrive.drain() == 1
    assert DeadLetter.objects.filter(task_id=f"kept-{name}").count() == 1
    assert _depth(client, source.dead_letter_url) == 0


@pytest.mark.django_db
def test_a_redriven_message_of_a_task_parked_already_leaves_its_letter_and_is_deleted(
        sqs_url, channel, name):
    from recovery.delivery.worker import park_poison

    # Given a task recovery parked already, saying what was wrong with it
    park_poison(task_id=f"parked-{name}", task_name="tests.integration.worker_tasks.flaky_twice",
                body=b"{}", content_type="application/json", headers={}, delivery_info={},
                exc=None, reason="invalid task message: what was wrong")
    # and its message in the dead-letter queue all the same
    redrive = Redrive(channel, [name])
    [source] = redrive.set_up()
    _publish(sqs_url, source.dead_letter_name, f"parked-{name}", [name])
    # When the worker drains it
    assert redrive.drain() == 0
    # Then the letter still says what was wrong, and SQS's copy is gone
    letter = DeadLetter.objects.get(task_id=f"parked-{name}")
    assert letter.reason == "invalid task message: what was wrong"
    assert len(letter.history) == 1
    assert _depth(channel.sqs(), source.dead_letter_url) == 0
