"""recovery.store.deliveries on the real PostgreSQL test database: what counts as a delivery.

The worker side (a real worker receiving, losing and handing back messages) is in
``tests/integration/test_worker_failures.py``.
"""

from __future__ import annotations

import pytest

from recovery.store.deliveries import count_redelivery, forget, note_handed_back, note_loss
from recovery.models import DeliveryCount

pytestmark = pytest.mark.django_db


def deliveries(task_id: str) -> int:
    return DeliveryCount.objects.get(task_id=task_id).deliveries


def test_a_first_delivery_handed_back_unused_leaves_the_next_one_counting_as_the_first():
    assert note_handed_back(["t1"]) == 1
    assert count_redelivery("t1") == (1, "")


def test_deliveries_handed_back_between_losses_do_not_count():
    note_loss("t1", "worker lost: signal 9")
    assert count_redelivery("t1")[0] == 2  # the first delivery was lost
    note_handed_back(["t1"])  # the second was received, then handed back on a deploy
    assert count_redelivery("t1") == (2, "worker lost: signal 9")
    note_handed_back(["t1"])
    note_handed_back(["t1"])  # handed back again before its receipt could be counted
    assert deliveries("t1") == 0
    assert count_redelivery("t1")[0] == 1


def test_handing_back_many_messages_takes_two_statements(django_assert_num_queries):
    note_loss("known", "hard time limit (5s) exceeded")
    ids = ["known"] + [f"new-{i}" for i in range(50)]
    with django_assert_num_queries(4):  # SAVEPOINT, UPDATE, INSERT, RELEASE
        assert note_handed_back(ids + ["", "known"]) == 51
    assert deliveries("known") == 0 and deliveries("new-7") == 0


def test_a_replay_forgets_the_count_that_parked_the_letter():
    count_redelivery("t1")
    count_redelivery("t2")
    forget(["t1"])
    assert not DeliveryCount.objects.filter(task_id="t1").exists()
    assert deliveries("t2") == 2
    assert count_redelivery("t1")[0] == 2
