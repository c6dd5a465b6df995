"""recovery.events and recovery.subscriptions: what the lifecycle announces, and who hears it.

A receiver whose parameters do not match what a sender passes would only be logged (each
receiver runs in its own ``try``), so a mismatch is caught here, statically: every
``send`` call site in recovery/ passes exactly the event's fields, and every receiver
recovery connects can be called with them.
"""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

import pytest
from celery.exceptions import Reject
from django.db import transaction

from recovery import events, subscriptions
from recovery.events import Event
from recovery.store import deferred

RECOVERY = Path(__file__).resolve().parents[2] / "recovery"


def make_event(**options) -> Event:
    return Event("test_event", "An event for a test.", fields=("value",), **options)


# -- the registry --------------------------------------------------------------------------------


def test_receivers_hear_an_event_in_the_order_they_connected():
    event, heard = make_event(), []
    event.connect(lambda value, **_: heard.append(("first", value)))
    event.connect(lambda value, **_: heard.append(("second", value)))

    event.send(value=7)

    assert heard == [("first", 7), ("second", 7)]


def test_connecting_the_same_receiver_twice_keeps_one():
    event, heard = make_event(), []

    def receiver(value, **_):
        heard.append(value)

    event.connect(receiver)
    event.connect(receiver)
    event.send(value=1)

    assert heard == [1] and event.receivers == (receiver,)


def test_a_receiver_that_raises_is_logged_and_the_others_still_hear(caplog):
    event, heard = make_event(), []

    def broken(value, **_):
        raise RuntimeError("exporter down")

    event.connect(broken)
    event.connect(lambda value, **_: heard.append(value))

    with caplog.at_level(logging.ERROR, logger="recovery.events"):
        event.send(value=3)  # does not raise

    assert heard == [3]
    assert "a receiver of test_event" in caplog.text and "exporter down" in caplog.text


def test_only_what_an_event_declares_may_reach_the_sender():
    event = make_event(may_raise=(Reject,))

    def requeue(value, **_):
        raise Reject("nowhere to keep it", requeue=True)

    event.connect(requeue)

    with pytest.raises(Reject):
        event.send(value=1)


def test_a_disconnected_receiver_hears_nothing_more():
    event, heard = make_event(), []

    def receiver(value, **_):
        heard.append(value)

    event.connect(receiver)
    event.disconnect(receiver)
    event.send(value=1)

    assert heard == []


@pytest.mark.django_db(transaction=True)
def test_an_announcement_on_commit_is_not_made_when_the_transaction_rolls_back():
    event, heard = make_event(), []
    event.connect(lambda value, **_: heard.append(value))

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            event.send_on_commit(value="rolled back")
            raise RuntimeError("the outcome did not happen")
    with transaction.atomic():
        event.send_on_commit(value="committed")
        assert heard == []  # not before the commit

    assert heard == ["committed"]


# -- senders and receivers agree -----------------------------------------------------------------


def _send_call_sites():
    """(module path, line, event name, keyword names) of every ``<event>.send(...)`` and
    ``<event>.send_on_commit(...)`` in recovery/."""
    names = {event.name for event in events.ALL}
    for path in sorted(RECOVERY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("send", "send_on_commit")):
                continue
            target = node.func.value
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name in names:
                yield (path.relative_to(RECOVERY.parent), node.lineno, name,
                       {keyword.arg for keyword in node.keywords})


def test_every_event_is_sent_somewhere_with_exactly_its_fields():
    by_name = {event.name: event for event in events.ALL}
    sites = list(_send_call_sites())
    wrong = [f"{path}:{line} sends {name} with {sorted(sent)}, "
             f"its fields are {sorted(by_name[name].fields)}"
             for path, line, name, sent in sites if sent != set(by_name[name].fields)]
    never_sent = sorted(set(by_name) - {name for _, _, name, _ in sites})

    assert wrong == []
    assert never_sent == []


@pytest.mark.parametrize("event, receiver", [
    pytest.param(event, receiver, id=f"{event.name}-{receiver.__module__}.{receiver.__qualname__}")
    for event, receivers in subscriptions.RECEIVERS for receiver in receivers
])
def test_every_receiver_accepts_its_events_fields(event, receiver):
    signature = inspect.signature(receiver)
    bound = signature.bind(**dict.fromkeys(event.fields))  # raises TypeError on a mismatch
    assert any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()), (
        "a receiver takes **extra, so that an event can grow a field")
    assert bound is not None


def test_after_django_is_set_up_every_receiver_is_connected():
    for event, receivers in subscriptions.RECEIVERS:
        assert set(receivers) <= set(event.receivers), event.name
    assert {event for event, _ in subscriptions.RECEIVERS} == set(events.ALL), (
        "an event nobody of ours listens to belongs in subscriptions with its listener, "
        "or is not needed")


def test_every_kind_of_deferred_write_has_its_applier_once_django_is_set_up():
    # The spool drain quarantines a record it has no applier for: an applier missing in
    # a process that drains would set aside a task's result as if it were corrupt.
    kinds = {value for name, value in vars(deferred).items()
             if name.isupper() and isinstance(value, str)}

    assert kinds == {"result", "replay_succeeded", "saga_succeeded"}
    assert kinds <= set(deferred._APPLIERS)
