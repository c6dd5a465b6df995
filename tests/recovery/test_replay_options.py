"""recovery.operations.replay_options: the allow-list, on a Celery app's configuration only."""

from __future__ import annotations

import pytest
from celery import Celery
from kombu import Queue

from recovery.core import headers as hdr
from recovery.operations.replay_options import (UnknownQueue, known_queues, replay_options, undecodable_body)


@pytest.fixture
def app():
    app = Celery("t", set_as_current=False)
    app.conf.task_queues = [Queue("celery"), Queue("reports")]
    app.conf.task_routes = [{"shop.tasks.*": {"queue": "shop"}}, lambda *a, **k: None]
    return app


def test_known_queues_are_the_default_the_declared_and_the_routed_ones(app):
    assert known_queues(app) == {"celery", "reports", "shop"}
    app.conf.task_routes = {"a.b": "mail", "a.c": {"queue": Queue("bulk")}}
    assert known_queues(app) == {"celery", "reports", "mail", "bulk"}


def test_only_the_queue_a_valid_priority_and_recoverys_own_headers_are_taken(app):
    stored = {"link": [{}], "link_error": [{}], "chain": [{}], "reply_to": "x",
              "exchange": "evil", "routing_key": "evil", "expires": 1, "priority": 4,
              "headers": {"x-evil": 1, hdr.SAGA: {"run": 3, "step": 0},
                          hdr.COMPENSATES: "t-1", hdr.HISTORY: [{}]}}
    options, headers = replay_options(stored, "reports", app)
    assert options == {"queue": "reports", "priority": 4}
    assert headers == {hdr.SAGA: {"run": 3, "step": 0}, hdr.COMPENSATES: "t-1"}
    options, _ = replay_options({"priority": "9; drop"}, "", app, queue="shop")
    assert options == {"queue": "shop"}


def test_an_unknown_chosen_or_original_queue_is_refused(app):
    with pytest.raises(UnknownQueue, match="'nowhere' is not one this app declares"):
        replay_options({}, "celery", app, queue="nowhere")
    with pytest.raises(UnknownQueue, match="parked from queue 'elsewhere'"):
        replay_options({}, "elsewhere", app)


@pytest.mark.parametrize("body, content_type, undecodable", [
    ("", "", False), ('[[1], {}, {}]', "application/json", False),
    ('{"this is": not json', "application/json", True), ('{"args": [1]}', "", True),
    ("base64:gASV", "application/x-python-serialize", True), ("[[1], {}]", "", True),
])
def test_a_body_is_undecodable_unless_it_is_args_kwargs_embed(body, content_type, undecodable):
    assert undecodable_body(body, content_type) is undecodable
