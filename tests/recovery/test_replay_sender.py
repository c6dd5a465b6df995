"""A bulk replay's direct publisher sends the message ``apply_async`` would, on real Redis.

Each case publishes a replay twice, once through :class:`ReplaySender` and once through
``signature.apply_async``, and compares the two messages on the broker field by field
(only the task id and what derives from it differ)."""

from __future__ import annotations

import functools
import gc
import json

import pytest
from celery import Task

from config.celery import app
from recovery.core.redaction import MASK
from recovery.models import DeadLetter
from recovery.operations import replay as service
from recovery.operations.replay_sender import ReplaySender
from recovery.task import RecoveryTask

pytestmark = pytest.mark.django_db(transaction=True)


@app.task(base=RecoveryTask, bind=True, name="tests.sender.recovery_with_secret")
def recovery_with_secret(self, order_id, password=None):
    return order_id


@app.task(name="tests.sender.plain")
def plain(order_id):
    return order_id


@app.task(name="tests.sender.tuned", queue="sender-tuned", priority=3, time_limit=30,
          soft_time_limit=20, ignore_result=True, serializer="json")
def tuned(order_id):
    return order_id


class StampingTask(RecoveryTask):
    """A project's own apply_async: the sender must leave it in charge."""

    def apply_async(self, args=None, kwargs=None, **options):
        headers = dict(options.pop("headers", None) or {}, stamped_by_project="yes")
        return super().apply_async(args, kwargs, headers=headers, **options)


@app.task(base=StampingTask, name="tests.sender.stamping")
def stamping(order_id):
    return order_id


@app.task(base=RecoveryTask, name="tests.sender.expiring", expires=600)
def expiring(order_id):
    return order_id


def _messages(broker, queue: str) -> list[dict]:
    """The queue's messages, oldest first; kombu keeps a prioritised message in a list
    of its own per priority step (``queue\\x06\\x16<step>``)."""
    keys = [key for key in broker.keys(f"{queue}*")
            if key == queue.encode() or key.startswith(f"{queue}\x06\x16".encode())]
    assert len(keys) <= 1, keys
    return [json.loads(raw) for key in keys for raw in reversed(broker.lrange(key, 0, -1))]


def _normalised(message: dict, task_id: str) -> dict:
    """The message with its task id, and what derives from it, taken out."""
    message = json.loads(json.dumps(message))
    headers, properties = message["headers"], message["properties"]
    assert headers.pop("id") == task_id
    assert headers.pop("root_id") == task_id
    assert properties.pop("correlation_id") == task_id
    properties.pop("delivery_tag")
    return message


CASES = [
    ("tests.sender.recovery_with_secret", [7], {"password": "hunter2"}, {"queue": "celery"}),
    ("tests.sender.plain", [7], {}, {"queue": "celery", "priority": 9}),
    ("tests.sender.tuned", [7], {}, {}),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "options"), CASES,
                         ids=[case[0].rsplit(".", 1)[1] for case in CASES])
def test_the_direct_message_is_the_one_apply_async_sends(broker, name, args, kwargs, options):
    signature = app.signature(name, args=args, kwargs=kwargs, **options)
    headers = {"recovery_replay": 2, "recovery_saga": {"id": "s1", "step": 0}}
    with app.producer_or_acquire() as producer:
        sender = ReplaySender(app, producer)
        assert sender.direct(name)
        sender.send(signature, "direct-1", dict(headers))
        sender.send(signature, "direct-2", dict(headers))  # the queue is declared by now
    signature.apply_async(task_id="celery-1", headers=dict(headers))
    queue = options.get("queue") or app.tasks[name].queue
    direct, second, celery = _messages(broker, queue)
    assert _normalised(direct, "direct-1") == _normalised(celery, "celery-1")
    assert _normalised(second, "direct-2") == _normalised(celery, "celery-1")
    assert direct["headers"]["recovery_replay"] == 2
    if kwargs.get("password"):
        assert "hunter2" not in direct["headers"]["kwargsrepr"]
        assert MASK in direct["headers"]["kwargsrepr"]


def test_a_task_with_its_own_apply_async_or_an_expiry_keeps_apply_async(broker):
    with app.producer_or_acquire() as producer:
        sender = ReplaySender(app, producer)
        assert not sender.direct("tests.sender.stamping")
        assert not sender.direct("tests.sender.expiring")
        assert sender.direct("tests.sender.plain")
        sender.send(app.signature("tests.sender.stamping", args=[1], queue="celery"),
                    "stamped-1", {"recovery_replay": 1})
    [message] = _messages(broker, "celery")
    assert message["headers"]["stamped_by_project"] == "yes"
    assert message["headers"]["recovery_replay"] == 1


@pytest.mark.parametrize("setting", ["task_send_sent_event", "task_always_eager"])
def test_eager_apps_and_sent_events_keep_apply_async(broker, setting):
    before = getattr(app.conf, setting)
    with app.producer_or_acquire() as producer:
        try:
            setattr(app.conf, setting, True)
            assert not ReplaySender(app, producer).direct("tests.sender.plain")
        finally:
            setattr(app.conf, setting, before)
        assert ReplaySender(app, producer).direct("tests.sender.plain")


def test_a_bad_argument_list_is_refused_as_apply_async_refuses_it(broker):
    signature = app.signature("tests.sender.plain", args=[1, 2, 3], queue="celery")
    with app.producer_or_acquire() as producer:
        with pytest.raises(TypeError):
            ReplaySender(app, producer).send(signature, "bad-1", {"recovery_replay": 1})
    assert _messages(broker, "celery") == []


def test_a_bulk_replay_publishes_directly_and_parks_back_a_letter_with_bad_arguments(broker):
    for n in range(3):
        DeadLetter.objects.create(task_id=f"bulk-{n}", task_name="tests.sender.recovery_with_secret",
                                  args=[n], kwargs={"password": f"pw-{n}"}, queue="celery",
                                  kind="dependency", fingerprint="f" * 40)
    DeadLetter.objects.create(task_id="bulk-bad", task_name="tests.sender.plain",
                              args=[1, 2, 3], kwargs={}, queue="celery",
                              kind="dependency", fingerprint="f" * 40)
    result = service.bulk("replay", DeadLetter.objects.all(), actor="alice")
    assert (result.done, result.failed) == (3, 1), result.errors
    sent = {m["headers"]["id"]: m for m in _messages(broker, "celery")}
    assert set(sent) == {"bulk-0", "bulk-1", "bulk-2"}
    assert all("pw-" not in m["headers"]["kwargsrepr"] for m in sent.values())
    assert all(m["headers"]["recovery_replay"] == 1 for m in sent.values())
    bad = DeadLetter.objects.get(task_id="bulk-bad")
    assert bad.status == DeadLetter.Status.PARKED and bad.replay_count == 0
    assert bad.events.get(action="replay_failed").outcome.startswith("could not publish")


def test_an_integration_wrapping_apply_async_keeps_apply_async(broker, monkeypatch):
    # Given Celery's apply_async wrapped the way sentry-sdk's Celery integration wraps it
    original = Task.apply_async

    @functools.wraps(original)
    def traced(self, args=None, kwargs=None, **options):
        headers = dict(options.pop("headers", None) or {}, **{"sentry-trace": "abc-def-1"})
        return original(self, args, kwargs, headers=headers, **options)

    monkeypatch.setattr(Task, "apply_async", traced)
    with app.producer_or_acquire() as producer:
        sender = ReplaySender(app, producer)
        # Then neither plain tasks nor RecoveryTask (whose super() goes through it) skip it
        assert not sender.direct("tests.sender.plain")
        assert not sender.direct("tests.sender.recovery_with_secret")
        sender.send(app.signature("tests.sender.plain", args=[1], queue="celery"), "traced-1",
                    {"recovery_replay": 1})
    [message] = _messages(broker, "celery")
    assert message["headers"]["sentry-trace"] == "abc-def-1"


def test_apply_async_or_send_task_patched_on_the_object_keeps_apply_async(broker, monkeypatch):
    with app.producer_or_acquire() as producer:
        monkeypatch.setattr(app.tasks["tests.sender.plain"], "apply_async",
                            app.tasks["tests.sender.plain"].apply_async)
        assert not ReplaySender(app, producer).direct("tests.sender.plain")
        monkeypatch.undo()
        monkeypatch.setattr(app, "send_task", app.send_task)
        assert not ReplaySender(app, producer).direct("tests.sender.plain")
        monkeypatch.undo()
        assert ReplaySender(app, producer).direct("tests.sender.plain")


def test_another_celery_version_keeps_apply_async(broker, monkeypatch):
    import celery

    monkeypatch.setattr(celery, "VERSION", celery.VERSION._replace(minor=celery.VERSION.minor + 1))
    with app.producer_or_acquire() as producer:
        assert not ReplaySender(app, producer).direct("tests.sender.plain")


def test_a_result_backend_subscription_ends_as_apply_async_ends_it(broker, monkeypatch):
    # Given a result backend that subscribes to a task's result when it is published
    # (Redis does) and unsubscribes when the AsyncResult send_task returned is dropped
    backend = app.backend
    calls = []
    monkeypatch.setattr(backend, "on_task_call", lambda producer, task_id: calls.append(("on", task_id)))
    monkeypatch.setattr(backend, "remove_pending_result",
                        lambda result: calls.append(("off", result.id)))
    signature = app.signature("tests.sender.plain", args=[1], queue="celery")
    with app.producer_or_acquire() as producer:
        ReplaySender(app, producer).send(signature, "direct-1", {"recovery_replay": 1})
    signature.apply_async(task_id="celery-1", headers={"recovery_replay": 1})
    gc.collect()
    # Then the direct path leaves none behind either
    assert calls == [("on", "direct-1"), ("off", "direct-1"), ("on", "celery-1"), ("off", "celery-1")]


def test_a_queue_kombu_does_not_cache_is_declared_for_every_message(broker):
    from kombu import Queue

    with app.producer_or_acquire() as producer:
        sender = ReplaySender(app, producer)
        cached, expiring = Queue("sender-cached"), Queue("sender-expiring", auto_delete=True)
        assert sender.declare_option(cached) == {}
        producer.maybe_declare(cached.bind(producer.channel))
        assert sender.declare_option(cached) == {"declare": []}
        producer.maybe_declare(expiring.bind(producer.channel))
        assert sender.declare_option(expiring) == {}
