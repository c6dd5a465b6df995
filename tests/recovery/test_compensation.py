"""Compensation: running a parked letter's declared undo task, on real PostgreSQL and Redis."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest
from celery import Celery
from django.db import connections

from recovery.operations import replay as service
from recovery.models import DeadLetter, DeadLetterEvent

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"  # charge_payment(self, order_id, amount_cents)
COMPENSATION = "tasks.tasks.cancel_order"  # cancel_order(self, order_id, amount_cents)
NO_COMPENSATION = "tasks.tasks.fetch_exchange_rate"  # declares none

_SHOP = None


def shop_app() -> Celery:
    """A second app whose tasks declare compensations that are broken in different ways.

    Built once for the module: registering the same task twice would warn.
    """
    global _SHOP
    if _SHOP is not None:
        return _SHOP
    app = Celery("shop", set_as_current=False)

    @app.task(name="shop.release")
    def release(reservation_id):
        return None

    @app.task(name="shop.reserve", compensate="shop.release")
    def reserve(sku, quantity):  # its payload does not fit release(reservation_id)
        return None

    @app.task(name="shop.ship", compensate="shop.recall")  # shop.recall is never registered
    def ship(order_id):
        return None

    @app.task(name="shop.pack", compensate=release)  # declared as a task, not a name
    def pack(reservation_id):
        return None

    _SHOP = app
    return app


def unreachable_app() -> Celery:
    """An app that publishes to a port nothing listens on (the broker is down)."""
    app = Celery("unreachable", set_as_current=False)
    # broker_url would be overridden by the CELERY_BROKER_URL environment variable;
    # the write URL is what publishing uses.
    app.conf.broker_write_url = "redis://127.0.0.1:1/0"
    return app


def make_letter(n: int = 1, **overrides) -> DeadLetter:
    values = dict(task_id=f"task-{n}", task_name=TASK, args=[n, 2_500], kwargs={},
                  headers={"chain": [{"task": "tasks.tasks.fetch_exchange_rate", "args": ["EUR"],
                                      "kwargs": {}, "options": {}, "subtask_type": None,
                                      "immutable": True}]},
                  kind="dependency", fingerprint="c" * 40, queue="celery",
                  exception_type="recovery.errors.DependencyError",
                  exception_message="card declined")
    values.update(overrides)
    return DeadLetter.objects.create(**values)


def published(broker, queue: str = "celery") -> list[dict]:
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def body(message: dict) -> list:
    raw = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        raw = base64.b64decode(raw)
    return json.loads(raw)


def assert_unchanged(letter: DeadLetter, broker, status: str = DeadLetter.Status.PARKED) -> None:
    letter.refresh_from_db()
    assert letter.status == status
    assert published(broker) == []
    assert not DeadLetterEvent.objects.filter(letter=letter).exists()


# -- which task undoes which ------------------------------------------------------------------


def test_compensation_name_is_the_declared_task_or_none():
    assert service.compensation_name(TASK) == COMPENSATION
    assert service.compensation_name(NO_COMPENSATION) is None
    assert service.compensation_name("shop.pack", shop_app()) == "shop.release"
    with pytest.raises(service.ReplayError, match="'billing.tasks.gone' is not registered"):
        service.compensation_name("billing.tasks.gone")


def test_the_compensation_task_id_is_stable_per_letter():
    letter = make_letter(7)
    assert service.compensation_task_id(letter) == "task-7.compensation"
    assert service.compensation_task_id(DeadLetter.objects.get(pk=letter.pk)) == \
        "task-7.compensation"


# -- one letter -------------------------------------------------------------------------------


def test_compensate_publishes_the_compensation_with_the_letters_payload_and_audits(broker):
    # Given a parked payment whose chain would have continued with an exchange-rate fetch
    letter = make_letter(7)
    # When an operator compensates it
    returned = service.compensate(letter, actor="alice", note="order cancelled by support")
    # Then the letter is compensated, and nothing else about it changed
    assert returned.status == DeadLetter.Status.COMPENSATED
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.COMPENSATED
    assert letter.replay_count == 0 and letter.args == [7, 2_500]
    # And cancel_order was published under the letter's compensation id, naming the letter
    [message] = published(broker)
    headers = message["headers"]
    assert headers["task"] == COMPENSATION
    assert headers["id"] == "task-7.compensation"
    assert headers["recovery_compensates"] == "task-7"
    assert "recovery_replay" not in headers
    args, kwargs, embed = body(message)
    assert (args, kwargs) == ([7, 2_500], {})
    # The failed task's workflow does not continue after its undo.
    assert embed["chain"] is None
    # And the operation is on the audit trail
    [event] = letter.events.all()
    assert (event.action, event.actor, event.note) == ("compensated", "alice",
                                                       "order cancelled by support")
    assert event.outcome == f"{COMPENSATION} published as task-7.compensation"


def test_compensate_passes_keyword_arguments_through(broker):
    letter = make_letter(8, args=[8], kwargs={"amount_cents": 900})
    service.compensate(letter.pk, actor="alice")  # by id, too
    [message] = published(broker)
    args, kwargs, _ = body(message)
    assert (args, kwargs) == ([8], {"amount_cents": 900})


def test_a_letter_is_compensated_once(broker):
    letter = make_letter()
    service.compensate(letter, actor="alice")
    with pytest.raises(service.ReplayError, match="only parked letters can be compensated"):
        service.compensate(letter, actor="bob")
    assert len(published(broker)) == 1
    assert list(letter.events.values_list("action", "actor")) == [("compensated", "alice")]


@pytest.mark.parametrize("status", ["replaying", "resolved", "discarded", "compensated"])
def test_compensating_a_letter_that_is_not_parked_changes_nothing(broker, status):
    letter = make_letter(status=status)
    with pytest.raises(service.ReplayError,
                       match=f"letter {letter.pk} is {status}; only parked letters can be "
                             f"compensated"):
        service.compensate(letter, actor="alice")
    assert_unchanged(letter, broker, status)


def test_a_task_without_a_declared_compensation_is_refused_and_nothing_changes(broker):
    letter = make_letter(task_name=NO_COMPENSATION, args=["EUR"])
    with pytest.raises(service.ReplayError) as caught:
        service.compensate(letter, actor="alice")
    message = str(caught.value)
    assert f"task '{NO_COMPENSATION}' declares no compensation" in message
    assert "compensate='<task name>'" in message and "discard or resolve" in message
    assert_unchanged(letter, broker)


def test_a_letter_of_an_unregistered_task_is_refused(broker):
    letter = make_letter(task_name="billing.tasks.gone")
    with pytest.raises(service.ReplayError, match="'billing.tasks.gone' is not registered"):
        service.compensate(letter, actor="alice")
    assert_unchanged(letter, broker)


def test_a_compensation_that_is_not_registered_is_refused_and_nothing_changes(broker):
    letter = make_letter(task_name="shop.ship", args=[5])
    with pytest.raises(service.ReplayError,
                       match="the compensation 'shop.recall' of 'shop.ship' is not registered"):
        service.compensate(letter, actor="alice", app=shop_app())
    assert_unchanged(letter, broker)


@pytest.mark.parametrize("task_name, args, kwargs, app, detail", [
    # cancel_order(order_id, amount_cents) given one argument
    (TASK, [1], {}, None, "arguments do not fit"),
    (TASK, [1, 2, 3], {}, None, "arguments do not fit"),
    (TASK, [1], {"amount_cents": 5, "surprise": True}, None, "arguments do not fit"),
    # a stored payload that is not even a list
    (TASK, {"order_id": 1}, {}, None, "args must be a JSON list"),
    # reserve(sku, quantity) is undone by release(reservation_id): the payload cannot fit
    ("shop.reserve", ["sku-1", 2], {}, "shop", "arguments do not fit shop.release"),
])
def test_a_payload_that_does_not_fit_the_compensation_is_refused(broker, task_name, args, kwargs,
                                                                 app, detail):
    letter = make_letter(task_name=task_name, args=args, kwargs=kwargs)
    compensation = "shop.release" if app else COMPENSATION
    with pytest.raises(service.ReplayError) as caught:
        service.compensate(letter, actor="alice", app=shop_app() if app else None)
    assert f"the compensation {compensation} cannot take this letter's payload" in str(caught.value)
    assert detail in str(caught.value)
    assert_unchanged(letter, broker)
    assert letter.args == args and letter.kwargs == kwargs


def test_a_compensation_that_cannot_be_published_parks_the_letter_again_audited(broker):
    # Given a parked letter, and a broker that is down
    letter = make_letter()
    # When it is compensated
    with pytest.raises(service.ReplayError,
                       match=f"could not publish the compensation of letter {letter.pk}"):
        service.compensate(letter, actor="alice", note="try 1", app=unreachable_app())
    # Then the letter is parked again, and the failure is on the audit trail
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED
    [event] = letter.events.all()
    assert (event.action, event.actor, event.note) == ("compensate_failed", "alice", "try 1")
    assert event.outcome.startswith(f"could not publish {COMPENSATION}: ")
    assert "Connection refused" in event.outcome
    assert published(broker) == []
    # And once the broker is back, the same letter can be compensated
    service.compensate(letter, actor="alice", note="try 2")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.COMPENSATED
    assert [m["headers"]["id"] for m in published(broker)] == ["task-1.compensation"]
    assert list(letter.events.order_by("pk").values_list("action", flat=True)) == [
        "compensate_failed", "compensated"]


# -- in bulk ----------------------------------------------------------------------------------


def test_bulk_compensate_compensates_the_parked_letters_and_counts_refusals(broker):
    # Given five payments, one letter whose task declares no compensation, one resolved letter
    for n in range(1, 6):
        make_letter(n)
    make_letter(6, task_name=NO_COMPENSATION, args=["EUR"])
    make_letter(7, status=DeadLetter.Status.RESOLVED)
    seen = []
    # When all of them are compensated in batches of two
    result = service.bulk("compensate", DeadLetter.objects.all(), actor="bob", batch_size=2,
                          note="incident 77", progress=lambda r: seen.append((r.done, r.failed)))
    # Then the five payments are compensated, each once, and the refusal is explained
    assert (result.done, result.failed) == (5, 1) and not result.ok
    [error] = result.errors
    assert error.startswith("letter ") and "declares no compensation" in error
    assert seen[-1] == (5, 1)
    messages = published(broker)
    assert sorted(m["headers"]["id"] for m in messages) == [
        f"task-{n}.compensation" for n in range(1, 6)]
    assert {m["headers"]["task"] for m in messages} == {COMPENSATION}
    assert {m["headers"]["recovery_compensates"] for m in messages} == {
        f"task-{n}" for n in range(1, 6)}
    assert DeadLetter.objects.filter(status="compensated").count() == 5
    assert DeadLetterEvent.objects.filter(action="compensated", actor="bob",
                                          note="incident 77").count() == 5
    # And the others are as they were
    assert DeadLetter.objects.get(task_id="task-6").status == DeadLetter.Status.PARKED
    assert DeadLetter.objects.get(task_id="task-7").status == DeadLetter.Status.RESOLVED
    assert DeadLetterEvent.objects.count() == 5
    # Running it again only meets the letter that cannot be compensated
    again = service.bulk("compensate", DeadLetter.objects.all(), actor="bob")
    assert (again.done, again.failed) == (0, 1)
    assert len(published(broker)) == 5


def test_bulk_compensate_with_the_broker_down_parks_every_letter_again(broker):
    for n in range(1, 4):
        make_letter(n)
    result = service.bulk("compensate", DeadLetter.objects.all(), actor="bob",
                          app=unreachable_app())
    assert (result.done, result.failed) == (0, 3)
    assert all("could not publish the compensation" in e for e in result.errors)
    assert DeadLetter.objects.filter(status="parked").count() == 3
    assert DeadLetterEvent.objects.filter(action="compensate_failed").count() == 3
    assert not DeadLetterEvent.objects.filter(action="compensated").exists()
    assert published(broker) == []


def test_an_interrupted_bulk_compensation_puts_unpublished_letters_back_to_parked(broker,
                                                                                  monkeypatch):
    for n in range(1, 6):
        make_letter(n)
    real_publish = service._publish_compensation
    calls = []

    def publish_then_interrupt(letter, **kwargs):
        calls.append(letter.pk)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the operator pressed Ctrl-C mid-batch
        return real_publish(letter, **kwargs)

    monkeypatch.setattr(service, "_publish_compensation", publish_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        service.bulk("compensate", DeadLetter.objects.all(), actor="bob", batch_size=10)
    assert len(published(broker)) == 2
    assert DeadLetter.objects.filter(status="compensated").count() == 2
    assert DeadLetter.objects.filter(status="parked").count() == 3
    # Running it again finishes the job, compensating nothing twice.
    monkeypatch.setattr(service, "_publish_compensation", real_publish)
    assert service.bulk("compensate", DeadLetter.objects.all(), actor="bob").done == 3
    assert sorted(m["headers"]["id"] for m in published(broker)) == [
        f"task-{n}.compensation" for n in range(1, 6)]


def test_two_concurrent_bulk_compensations_compensate_each_letter_once(broker, monkeypatch):
    # Given 300 parked letters, and two operators compensating all of them at the same moment
    DeadLetter.objects.bulk_create([
        DeadLetter(task_id=f"t-{i}", task_name=TASK, args=[i, 100], kwargs={},
                   fingerprint="c" * 40, kind="dependency")
        for i in range(300)
    ])
    real_publish = service._publish_compensation

    def slow_publish(letter, **kwargs):
        time.sleep(0.002)  # a broker round trip, so the two runs overlap
        return real_publish(letter, **kwargs)

    monkeypatch.setattr(service, "_publish_compensation", slow_publish)
    start = threading.Barrier(2)
    results, failures = {}, []

    def operator(name):
        try:
            start.wait(timeout=10)
            results[name] = service.bulk("compensate", DeadLetter.objects.all(), actor=name,
                                         batch_size=25)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=operator, args=(name,)) for name in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and len(results) == 2
    # Then each letter was compensated exactly once, the work split between the two
    assert [e for r in results.values() for e in r.errors] == []
    assert results["alice"].done + results["bob"].done == 300
    assert results["alice"].done > 0 and results["bob"].done > 0
    ids = [m["headers"]["id"] for m in published(broker)]
    assert len(ids) == 300 and len(set(ids)) == 300
    assert DeadLetter.objects.filter(status="compensated").count() == 300
    events = DeadLetterEvent.objects.filter(action="compensated")
    assert events.count() == 300
    assert events.values("letter").distinct().count() == 300
    assert {e.actor: 0 for e in events}.keys() == {"alice", "bob"}


# -- the first requests of a process --------------------------------------------------------


LAZY_TASKS = '''
import time
import uuid

from celery import shared_task

time.sleep(0.5)  # a task module that takes a while to import


@shared_task(name="{pkg}.charge", compensate="{pkg}.refund")
def charge(order_id, amount_cents):
    return None


@shared_task(name="{pkg}.refund")
def refund(order_id, amount_cents):
    return None
'''


def test_two_threads_asking_for_a_lazily_imported_task_both_find_it(tmp_path, monkeypatch):
    # Given an app whose task modules are not imported yet (a web process just started)
    pkg = f"lazy_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "tasks.py").write_text(LAZY_TASKS.format(pkg=pkg))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Celery("lazy", set_as_current=False)
    app.autodiscover_tasks([pkg])
    start = threading.Barrier(2)
    answers = []

    def ask():
        start.wait(timeout=10)
        try:
            answers.append(service.compensation_name(f"{pkg}.charge", app))
        except service.ReplayError as exc:
            answers.append(exc)

    # When two requests need one of its tasks at the same moment
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Then both wait for the import instead of declaring the task unknown
    assert answers == [f"{pkg}.refund", f"{pkg}.refund"]
