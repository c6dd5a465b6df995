"""recovery.delivery.topology and recovery.core.brokers: the broker's URL decides the
rest of its configuration; what the project set itself wins."""

from __future__ import annotations

import json
import os

import pytest
from celery import Celery
from kombu import Exchange, Queue

import recovery
from recovery.checks import check_recovery_settings
from recovery.core.brokers import broker_delay, broker_kind, uses_native_delayed_delivery
from recovery.delivery import topology
from recovery.delivery.broker_dead_letters import death_account


@pytest.mark.parametrize(("url", "kind"), [
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp"),
    ("pyamqp://h/vhost", "amqp"),
    ("amqps://h", "amqp"),
    ("redis://127.0.0.1:6379/0", "redis"),
    ("rediss://h:6380/0", "redis"),
    ("sentinel://h:26379;sentinel://h2:26379", "redis"),
    ("sqs://key:secret@127.0.0.1:5000", "sqs"),
    ("sqs://", "sqs"),
    ("filesystem://", "filesystem"),
    ("amqp://a//;amqp://b//", "amqp"),
    ("", ""),
    (None, ""),
])
def test_the_broker_kind_is_read_from_the_url(url, kind):
    assert broker_kind(url) == kind


@pytest.fixture(autouse=True)
def _broker_from_the_app(monkeypatch):
    # Celery takes CELERY_BROKER_URL from the environment over the app's own broker.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)


def _app(url: str, **conf) -> Celery:
    app = Celery("topology-test", broker=url, set_as_current=False)
    app.conf.update(**conf)
    return recovery.setup(app)


def test_rabbitmq_gets_delivery_limited_dead_lettering_quorum_queues_on_a_topic_exchange():
    app = _app("amqp://guest:guest@127.0.0.1:5672//")
    queue = app.amqp.queues["celery"]

    assert app.conf.task_default_queue_type == "quorum"
    assert app.conf.task_create_missing_queue_type == "quorum"
    assert queue.exchange.type == "topic" and queue.exchange.name == "celery"
    assert queue.routing_key == "celery"
    assert queue.queue_arguments == {
        "x-queue-type": "quorum", "x-delivery-limit": 20,
        "x-dead-letter-exchange": "recovery.dead_letter",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    assert app.conf.broker_transport_options["confirm_publish"] is True
    assert "visibility_timeout" not in app.conf.broker_transport_options
    assert uses_native_delayed_delivery(app)


def test_the_delivery_limit_and_the_default_queue_follow_the_settings(settings):
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_DELIVERY_LIMIT": 7}
    app = _app("amqp://h//", task_default_queue="orders")

    queue = app.amqp.queues["orders"]
    assert queue.queue_arguments["x-delivery-limit"] == 7
    assert queue.exchange.name == "orders" and queue.routing_key == "orders"


def test_exchange_and_queue_types_the_project_chose_are_kept():
    app = _app("amqp://h//", task_default_exchange_type="fanout",
               task_create_missing_queue_exchange_type="fanout")

    assert app.conf.task_default_exchange_type == "fanout"
    assert app.amqp.queues["celery"].exchange.type == "fanout"
    assert app.conf.task_create_missing_queue_exchange_type == "fanout"
    assert app.conf.task_default_queue_type == "quorum", "Celery's default gave way"


def test_a_projects_own_rabbitmq_queues_and_options_are_kept():
    own = Queue("mine", Exchange("mine", type="direct"), routing_key="mine")
    app = _app("amqp://h//", task_queues=(own,),
               broker_transport_options={"confirm_publish": False})

    assert list(app.amqp.queues) == ["mine"]
    assert app.amqp.queues["mine"].queue_arguments is None
    assert app.conf.broker_transport_options["confirm_publish"] is False
    assert topology.missing_protection(app.amqp.queues) == ["mine"]


def test_redis_gets_the_visibility_timeout_and_keeps_classic_queues():
    app = _app("redis://127.0.0.1:6379/0")

    assert app.conf.broker_transport_options["visibility_timeout"] > 0
    assert app.conf.task_default_queue_type == "classic"
    assert not uses_native_delayed_delivery(app)


def test_topology_off_leaves_every_broker_setting_alone(settings):
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_TOPOLOGY": "off"}
    for url in ("amqp://h//", "redis://h/0"):
        app = _app(url)
        assert app.conf.task_default_queue_type == "classic"
        assert not app.conf.broker_transport_options
        assert not app.conf.task_queues


@pytest.mark.parametrize(("seconds", "expected"), [(0.16, 1.0), (1.0, 1.0), (1.2, 2.0),
                                                    (29.5, 30.0), (0, 0)])
def test_native_delayed_delivery_carries_whole_seconds_rounded_up(seconds, expected):
    assert broker_delay(_app("amqp://h//"), seconds) == expected


def test_other_brokers_carry_a_delay_as_it_is():
    assert broker_delay(_app("redis://h/0"), 0.16) == 0.16


def test_rabbitmqs_account_of_a_dead_letter_is_read_from_its_headers():
    from datetime import datetime, timezone

    at = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
    account = death_account({"x-death": [{"reason": "delivery_limit", "queue": "orders",
                                          "count": 2, "time": at}],
                             "x-delivery-count": 21})
    assert account == {"reason": "delivery_limit", "queue": "orders", "count": 2,
                       "time": "2026-12-05T12:00:00+00:00", "delivery_count": 21}
    # forged or missing headers give an account that says it does not know
    assert death_account({"x-death": "nonsense", "x-delivery-count": "x"}) == {
        "reason": "unknown", "queue": "", "count": 1, "time": "", "delivery_count": None}
    assert death_account(None)["reason"] == "unknown"


def test_a_broken_broker_setting_is_an_error_at_start_up(settings):
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_TOPOLOGY": "quorum"}
    assert [p.id for p in check_recovery_settings()] == ["recovery.E030"]
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_TOPOLOGY": "auto",
                         "BROKER_DELIVERY_LIMIT": settings.RECOVERY["MAX_DELIVERIES"]}
    problems = check_recovery_settings()
    assert [p.id for p in problems] == ["recovery.E031"]
    assert "not above MAX_DELIVERIES" in problems[0].msg
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_DELIVERY_LIMIT": "20"}
    assert [p.id for p in check_recovery_settings()] == ["recovery.E031"]


def test_unprotected_rabbitmq_queues_of_the_project_are_a_warning(settings):
    from celery import current_app

    own = Queue("mine", Exchange("mine", type="topic"), routing_key="mine")
    before = (current_app.conf.broker_url, current_app.conf.task_queues)
    current_app.conf.broker_url, current_app.conf.task_queues = "amqp://h//", (own,)
    try:
        problems = check_recovery_settings()
    finally:
        current_app.conf.broker_url, current_app.conf.task_queues = before
    assert [p.id for p in problems] == ["recovery.W020"]
    assert "mine" in problems[0].msg


def test_a_local_sqs_server_gets_plain_http_a_region_and_short_polls(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    app = _app("sqs://testing:testing@127.0.0.1:4566")

    options = app.conf.broker_transport_options
    assert options["is_secure"] is False
    assert options["region"] == "us-east-1"
    assert options["visibility_timeout"] == 12  # VISIBILITY_TIMEOUT_SECONDS of the test settings
    assert options["wait_time_seconds"] == 1
    assert app.conf.task_default_queue_type == "classic" and not app.conf.task_queues


def test_kombu_reaches_a_local_sqs_server_over_http_with_those_options(sqs_url):
    from kombu import Connection

    options = _app(sqs_url).conf.broker_transport_options
    with Connection(sqs_url, transport_options=options) as connection:
        channel = connection.default_channel
        assert channel.endpoint_url.startswith("http://127.0.0.1:")
        assert channel.sqs().list_queues()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_aws_keeps_tls_and_takes_its_region_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    options = _app("sqs://AKIAEXAMPLE:secret@").conf.broker_transport_options
    assert options == {"visibility_timeout": 12, "region": "eu-west-1"}
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert "region" not in _app("sqs://").conf.broker_transport_options


def test_the_projects_own_sqs_options_win_key_by_key(monkeypatch):
    app = _app("sqs://k:s@localhost:9324",
               broker_transport_options={"region": "eu-central-1", "visibility_timeout": 300})
    options = app.conf.broker_transport_options
    assert options["region"] == "eu-central-1" and options["visibility_timeout"] == 300
    assert options["is_secure"] is False


@pytest.mark.parametrize(("url", "loopback"), [
    ("sqs://k:s@127.0.0.1:4566", True), ("sqs://k:s@localhost:9324", True),
    ("sqs://k:s@[::1]:4566", True), ("sqs://k:s@sqs.eu-west-1.amazonaws.com", False),
    ("sqs://", False), ("sqs://k:s@10.0.0.5:4566", False),
])
def test_only_a_loopback_host_is_a_local_sqs_server(url, loopback):
    assert topology.is_loopback_url(url) is loopback


@pytest.mark.parametrize(("queue", "dead"), [
    ("celery", "celery-dead-letters"),
    ("orders.fifo", "orders-dead-letters.fifo"),
    ("x" * 80, "x" * 67 + "-dead-letters"),
])
def test_an_sqs_queues_dead_letter_queue_is_named_after_it_within_sqss_limits(queue, dead):
    assert topology.sqs_dead_letter_queue_name(queue) == dead
    assert len(dead) <= 80


def test_the_redrive_policy_receives_a_message_broker_delivery_limit_times(settings):
    settings.RECOVERY = {**settings.RECOVERY, "BROKER_DELIVERY_LIMIT": 9}
    assert json.loads(topology.sqs_redrive_policy("arn:aws:sqs:us-east-1:1:q-dead-letters")) == {
        "deadLetterTargetArn": "arn:aws:sqs:us-east-1:1:q-dead-letters", "maxReceiveCount": "9"}


def test_sqs_gets_recoverys_repaired_transport_unless_the_project_named_one():
    assert _app("sqs://k:s@127.0.0.1:4566").conf.broker_transport == topology.SQS_TRANSPORT
    assert _app("sqs://", broker_transport="proj.sqs:Transport").conf.broker_transport == \
        "proj.sqs:Transport"
    assert not _app("redis://h/0").conf.broker_transport


DELAYED_KEY = "0." * 27 + "1.celery"


def test_a_letters_queue_is_read_without_the_delay_bits_of_a_delayed_retry():
    from recovery.core.brokers import delivered_queue

    assert delivered_queue({"routing_key": DELAYED_KEY}) == "celery"
    assert delivered_queue({"routing_key": "orders"}) == "orders"
    assert delivered_queue({"routing_key": "1.0.orders"}) == "1.0.orders"
    assert delivered_queue(None) == ""


def test_a_replay_of_a_delayed_retry_goes_to_its_queue_not_to_the_delay_exchange():
    from recovery.core.brokers import delivered_route

    queues = {"celery": Queue("celery", Exchange("celery", type="topic"), routing_key="celery")}
    delayed = {"exchange": "celery_delayed_delivery", "routing_key": DELAYED_KEY}
    assert delivered_route(delayed, queues) == {"queue": "celery"}
    assert delivered_route({**delayed, "exchange": "app_celery_delayed_3"}, {}) == {
        "routing_key": "celery"}
    assert delivered_route({"exchange": "celery", "routing_key": "celery"}, queues) == {
        "exchange": "celery", "routing_key": "celery"}
    assert delivered_route({"exchange": "", "routing_key": "celery"}) == {"routing_key": "celery"}


def test_the_queue_a_run_was_delivered_from_is_named_by_its_routing_key():
    from recovery.core.brokers import queue_delivered_from

    queues = {"celery": Queue("celery", Exchange("celery", type="topic"), routing_key="celery"),
              "reports": Queue("reports", Exchange("reports", type="topic"),
                               routing_key="reports.daily")}
    assert queue_delivered_from({"exchange": "reports", "routing_key": "reports.daily"},
                                queues) == "reports"
    delayed = {"exchange": "celery_delayed_delivery", "routing_key": DELAYED_KEY}
    assert queue_delivered_from(delayed, queues) == "celery"
    assert queue_delivered_from({"routing_key": "elsewhere"}, queues) is None
    assert queue_delivered_from(None, queues) is None


@pytest.mark.django_db
def test_a_retry_noted_as_waiting_in_the_broker_counts_until_shortly_after_it_is_due(settings):
    from recovery.workflows import broker_waits

    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "database"}
    broker_waits.note("t-1", 10, now=1000.0)
    broker_waits.note("t-1", 2, now=1001.0)  # an earlier due time never shortens the wait
    assert broker_waits.waiting(["t-1", "t-2"], now=1005.0) == {"t-1"}
    assert broker_waits.waiting(["t-1"], now=1010.0 + broker_waits.GRACE_SECONDS - 1) == {"t-1"}
    assert broker_waits.waiting(["t-1"], now=1010.0 + broker_waits.GRACE_SECONDS + 1) == set()


@pytest.mark.django_db
def test_notes_of_retries_long_past_due_are_dropped_from_the_database(settings):
    from datetime import timedelta

    from django.utils import timezone

    from recovery.models import SharedState
    from recovery.workflows import broker_waits

    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "database"}
    broker_waits.note("old", 1)
    broker_waits.note("recent", 1)
    keep_for = settings.RECOVERY["BROKER_DELAY_MAX_SECONDS"] + 2 * broker_waits.GRACE_SECONDS
    SharedState.objects.filter(key="waiting:old").update(
        updated_at=timezone.now() - timedelta(seconds=keep_for + 1))
    SharedState.objects.create(key="circuit:payments", value={"state": "open"})
    SharedState.objects.filter(key="circuit:payments").update(
        updated_at=timezone.now() - timedelta(days=1))

    assert broker_waits.forget_past() == 1
    assert set(SharedState.objects.values_list("key", flat=True)) == {
        "waiting:recent", "circuit:payments"}, "only old broker-wait notes go"


def test_a_note_kept_in_redis_expires_by_itself(settings):
    import redis

    from recovery.workflows import broker_waits, shared_state

    url = os.environ.get("TEST_STORE_URL", "redis://127.0.0.1:6379/11")
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": url}
    broker_waits.note("t-ttl", 4)
    client = redis.Redis.from_url(url)
    ttl = client.ttl(shared_state.KEY_PREFIX + "waiting:t-ttl")
    client.delete(shared_state.KEY_PREFIX + "waiting:t-ttl")
    assert 4 + 2 * broker_waits.GRACE_SECONDS - 2 <= ttl <= 4 + 2 * broker_waits.GRACE_SECONDS


def test_a_note_that_cannot_be_written_never_stops_the_retry(settings, caplog):
    from recovery.workflows import broker_waits

    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "redis://127.0.0.1:1/0"}
    broker_waits.note("t-1", 5)
    assert "could not note that t-1 waits" in caplog.text


def test_a_dead_lettered_message_that_cannot_be_parked_is_given_back_after_a_pause(
        monkeypatch, caplog):
    """Held unacknowledged it would take a prefetch slot until the connection closes (ten
    such and the drain stops); given back at once it would loop as fast as parking fails."""
    from recovery.delivery import broker_dead_letters

    def refuse(message, hostname=""):
        raise OSError("database down and spool unwritable")

    monkeypatch.setattr(broker_dead_letters, "park_dead_lettered", refuse)
    calls = []

    class Message:
        headers = {"id": "t-dlx"}

        def reject(self, requeue=False):
            calls.append(("reject", requeue))

        def ack(self):
            calls.append(("ack",))

    class Timer:
        def call_after(self, seconds, callback):
            calls.append(("after", seconds))
            self.callback = callback

    step = object.__new__(broker_dead_letters.BrokerDeadLetters)
    step.hostname, step.timer = "w1", Timer()
    step.on_message(Message())
    assert calls == [("after", broker_dead_letters.RETRY_PARK_SECONDS)]
    step.timer.callback()
    assert calls[-1] == ("reject", True)
    assert "goes back to recovery.dead_letters" in caplog.text
