"""recovery.store.due against real PostgreSQL and a real Redis broker: each due retry is
published once, even when the broker fails in the middle of a batch."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from celery import Celery, Signature
from celery.signals import before_task_publish
from django.utils import timezone

from recovery.store.due import BATCH_ROWS, hold, publish_due
from recovery.models import DeadLetter, DueRetry
from tests.integration.harness import TcpProxy

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.import_rows"


@pytest.fixture
def redis_proxy(broker, monkeypatch):
    """The test Redis behind a proxy that can be cut, and an app publishing through it."""
    connection = broker.connection_pool.connection_kwargs
    proxy = TcpProxy(connection.get("host", "127.0.0.1"), int(connection.get("port", 6379)))
    monkeypatch.delenv("CELERY_BROKER_URL")  # it would win over the app's broker argument
    app = Celery("due-test", set_as_current=False,
                 broker=f"redis://127.0.0.1:{proxy.port}/{connection.get('db', 0)}")
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_transport_options = {}
    yield proxy, app
    app.close()
    proxy.close()


def due_rows(count: int) -> list[str]:
    """``count`` retries due a minute ago, oldest first; returns their task ids."""
    now = timezone.now()
    ids = []
    for n in range(count):
        task_id = f"due-{n}"
        hold(Signature(TASK, args=(n,), options={"task_id": task_id}),
             now - timedelta(seconds=60 - n))
        ids.append(task_id)
    return ids


def queued_ids(broker) -> list[str]:
    """Task ids of the messages really on the Redis queue, in order."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(broker.lrange("celery", 0, -1))]


@pytest.mark.parametrize("rows, failing_publish", [(6, 4), (3, 1), (BATCH_ROWS + 5, BATCH_ROWS + 3)],
                         ids=["fourth of six", "first", "in the second batch"])
def test_a_broker_failure_mid_batch_publishes_every_row_exactly_once(redis_proxy, broker, rows,
                                                                     failing_publish):
    proxy, app = redis_proxy
    assert app.connection_for_write().port == proxy.port
    # Given due retries, and a broker that drops off the network at the k-th publish
    ids = due_rows(rows)
    publishes = []

    def cut_at_the_kth(sender=None, headers=None, **kwargs):
        publishes.append(headers["id"])
        if len(publishes) == failing_publish:
            proxy.cut()

    before_task_publish.connect(cut_at_the_kth, weak=False)
    try:
        # When the due-table is published
        sent = publish_due(app)
    finally:
        before_task_publish.disconnect(cut_at_the_kth)

    # Then the rows published before the failure are on the queue and gone from the
    # table, and the failed row and those after it wait for the next tick
    k = failing_publish - 1
    assert sent == k
    assert queued_ids(broker) == ids[:k]
    assert list(DueRetry.objects.order_by("due_at").values_list("task_id", flat=True)) == ids[k:]

    # When the broker is back and the next ticks run
    proxy.restore()
    assert publish_due(app) == rows - k
    assert publish_due(app) == 0

    # Then every row was published exactly once, in due order
    assert queued_ids(broker) == ids
    assert not DueRetry.objects.exists()


def test_rows_not_yet_due_stay_in_the_table(redis_proxy, broker):
    _proxy, app = redis_proxy
    ids = due_rows(2)
    hold(Signature(TASK, args=(9,), options={"task_id": "later"}),
         timezone.now() + timedelta(minutes=5))
    assert publish_due(app) == 2
    assert queued_ids(broker) == ids
    assert list(DueRetry.objects.values_list("task_id", flat=True)) == ["later"]


def test_the_limit_bounds_one_tick_and_the_next_tick_takes_the_rest(redis_proxy, broker):
    _proxy, app = redis_proxy
    ids = due_rows(5)
    assert publish_due(app, limit=3) == 3
    assert queued_ids(broker) == ids[:3]
    assert publish_due(app, limit=3) == 2
    assert queued_ids(broker) == ids


def test_a_row_that_can_never_be_published_is_parked_and_the_rows_behind_it_flow(redis_proxy,
                                                                                 broker):
    _proxy, app = redis_proxy
    # Given a corrupt row (its arguments are not a list) between two good ones
    ids = due_rows(1)
    DueRetry.objects.create(task_id="corrupt", task_name=TASK,
                            due_at=timezone.now() - timedelta(seconds=30),
                            signature={"task": TASK, "args": 5, "kwargs": {},
                                       "options": {"task_id": "corrupt", "queue": "celery"}})
    ids += ["due-later"]
    hold(Signature(TASK, args=(2,), options={"task_id": "due-later"}),
         timezone.now() - timedelta(seconds=1))
    # When the due-table is published
    assert publish_due(app) == 2
    # Then the good rows are sent, and the corrupt one is a poison dead letter
    assert queued_ids(broker) == ids
    assert not DueRetry.objects.exists()
    letter = DeadLetter.objects.get(task_id="corrupt")
    assert (letter.kind, letter.permanent, letter.task_name) == ("poison", True, TASK)
    assert letter.reason == "its due retry could not be published"
    assert letter.exception_type == "builtins.TypeError"
    assert letter.headers == {"queue": "celery"}
    assert json.loads(letter.raw_body)["args"] == 5


def test_a_retry_whose_task_id_no_column_can_hold_still_waits_here_and_keeps_its_id(redis_proxy,
                                                                                   broker):
    _proxy, app = redis_proxy
    long_id = "import-" + "r" * 293
    row = hold(Signature(TASK, args=(1,), options={"task_id": long_id}),
               timezone.now() - timedelta(seconds=1))
    assert row.task_id.startswith("task-id-sha256-")
    assert publish_due(app) == 1
    assert queued_ids(broker) == [long_id]
