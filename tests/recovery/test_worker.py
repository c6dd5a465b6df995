"""RecoveryRequest.on_failure in the worker's main process: "cannot be decoded" only when
decoding failed. The request is built from a protocol-2 message the way the consumer builds
it (celery.contrib.testing.mocks.TaskMessage); letters are written to real PostgreSQL."""

from __future__ import annotations

import pytest
from billiard.einfo import ExceptionInfo
from celery.contrib.testing.mocks import TaskMessage
from django.db import OperationalError
from django_celery_results.models import TaskResult

from config.celery import app
from recovery.models import DeadLetter
from recovery.delivery.worker import RecoveryRequest
from tests.integration import worker_tasks as t

pytestmark = pytest.mark.django_db


def request_for(message) -> RecoveryRequest:
    message.delivery_info = {"exchange": "", "routing_key": "celery", "redelivered": False}
    return RecoveryRequest(message, app=app, task=app.tasks[t.flaky_twice.name],
                           hostname="w1@host", on_ack=message.ack_log_error)


def pool_error(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except type(exc):
        return ExceptionInfo()


def test_an_internal_error_after_a_decodable_body_is_neither_parked_nor_marked_failed():
    # The child stored nothing (our result store refused) and the error escaped the tracer
    message = TaskMessage(t.flaky_twice.name, args=["k"])
    request = request_for(message)

    request.on_failure(pool_error(OperationalError("server closed the connection")))

    assert not DeadLetter.objects.filter(task_id=request.id).exists()
    assert not TaskResult.objects.filter(task_id=request.id).exists()
    message.ack_log_error.assert_called_once()  # acknowledged, as Celery does for a failure


def test_a_body_that_does_not_decode_is_parked_as_poison_that_cannot_be_decoded():
    message = TaskMessage(t.flaky_twice.name, args=["k"])
    message.body = b'{"this is": not json'
    request = request_for(message)

    request.on_failure(pool_error(ValueError("Expecting value: line 1 column 13")))

    letter = DeadLetter.objects.get(task_id=request.id)
    assert letter.kind == "poison"
    assert letter.reason == "message body cannot be decoded"
    assert letter.raw_body == '{"this is": not json'


def test_a_body_of_the_wrong_shape_counts_as_undecodable():
    message = TaskMessage(t.flaky_twice.name)
    message.body = b'{"args": [1]}'
    request = request_for(message)

    assert request._body_undecodable()
    assert not request_for(TaskMessage(t.flaky_twice.name, args=[1]))._body_undecodable()


@pytest.mark.parametrize(("receive_count", "counted"), [("1", False), ("2", True), (None, False)])
def test_a_message_sqs_handed_out_before_counts_as_a_redelivery(receive_count, counted):
    """SQS never rewrites a message: its redelivered mark stays what the publisher wrote,
    and its ApproximateReceiveCount says a worker lost it (or gave it back) already."""
    from recovery.store.models import DeliveryCount

    message = TaskMessage(t.flaky_twice.name, args=["k"])
    attributes = {"ApproximateReceiveCount": receive_count} if receive_count else {}
    message.delivery_info = {"exchange": "", "routing_key": "celery", "redelivered": False,
                             "sqs_message": {"Attributes": attributes}}
    request = RecoveryRequest(message, app=app, task=app.tasks[t.flaky_twice.name],
                              hostname="w1@host", on_ack=message.ack_log_error)

    assert DeliveryCount.objects.filter(task_id=request.id).exists() is counted
