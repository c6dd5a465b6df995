"""What a worker's clean shutdown says it handed back unused (recovery.delivery.handback),
read from the worker's own request state as on an AMQP broker."""

from __future__ import annotations


import pytest
from celery.worker import state

from recovery.delivery import handback
from recovery.delivery.worker import RecoveryConsumer


@pytest.fixture(autouse=True)
def _clean_state():
    yield
    state.reserved_requests.clear()
    state.active_requests.clear()
    state.should_stop = None
    handback.started_after_close = None


class _Request:
    """What the worker's state sets hold (weakly): requests with an id."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id


def _request(task_id: str) -> _Request:
    return _Request(task_id)



def test_a_request_the_pool_starts_during_a_warm_shutdown_was_not_handed_back(monkeypatch):
    # Given a worker shutting down cleanly with two requests received and not started
    first, second = _request("t-first"), _request("t-second")
    state.reserved_requests.update({first, second})
    state.should_stop = 0
    consumer = object.__new__(RecoveryConsumer)
    consumer.task_consumer = None
    monkeypatch.setattr("celery.worker.consumer.Consumer.on_close", lambda self: None)
    # When the consumer closes, and then the pool, finishing its work, starts the first
    RecoveryConsumer.on_close(consumer)
    handback.note_started("t-first")
    state.reserved_requests.clear()
    # Then only the second was handed back unused
    assert handback.handed_back_ids(consumer) == {"t-second"}


def test_a_lost_connection_records_nothing_of_what_starts_after_it(monkeypatch):
    held = _request("t-held")  # the state holds requests weakly
    state.reserved_requests.add(held)
    consumer = object.__new__(RecoveryConsumer)
    consumer.task_consumer = None
    monkeypatch.setattr("celery.worker.consumer.Consumer.on_close", lambda self: None)
    RecoveryConsumer.on_close(consumer)
    handback.note_started("t-held")
    assert handback.started_after_close is None, "a reconnecting worker keeps no growing set"
    assert consumer.recovery_unstarted == {"t-held"}
