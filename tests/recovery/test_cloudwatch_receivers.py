"""recovery.observe.cloudwatch.receivers: the lifecycle's events become CloudWatch counts with
bounded dimensions, only while "cloudwatch-emf" is listed, without ever failing a task; and
each process publishes only its own counts."""

from __future__ import annotations

import logging
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery

from recovery import RecoveryTask, RetryPolicy, events
from recovery.core.errors import DependencyError
from recovery.models import DeadLetter
from recovery.observe import metrics
from recovery.observe.cloudwatch import receivers
from recovery.store.parking import ParkRecord, park

from .emf_spec import emf_lines, totals
from .moto_cloudwatch import moto_cloudwatch  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db(transaction=True)


class Lines(logging.Handler):
    """The project's own handler on the EMF logger: keeps each line."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def documents(self) -> list[dict]:
        receivers.flush()
        return emf_lines("\n".join(self.lines))


@pytest.fixture
def emf(settings, request):
    """CloudWatch on (and Prometheus off), its lines kept by a handler of this test."""
    name = f"tests.emf.{request.node.name}"
    handler = Lines()
    logging.getLogger(name).addHandler(handler)
    settings.RECOVERY = {**settings.RECOVERY, "METRICS_BACKENDS": ["cloudwatch-emf"],
                         "CLOUDWATCH": {"LOGGER": name, "FLUSH_INTERVAL_SECONDS": 3600}}
    yield handler
    receivers.stop_publishing(timeout_seconds=1)
    logging.getLogger(name).removeHandler(handler)


@pytest.fixture
def app():
    app = Celery("cloudwatch", set_as_current=False)
    app.conf.task_always_eager = True
    return app


def prometheus(name: str, **labels: str) -> float:
    return metrics.registry().get_sample_value(name, labels) or 0.0


def letter(task_id: str, **overrides) -> ParkRecord:
    values = dict(task_id=task_id, task_name="proj.charge", kind="dependency", reason="gave up",
                  exception_type="recovery.errors.DependencyError", exception_message="503",
                  queue="celery")
    values.update(overrides)
    return ParkRecord(**values)


def test_a_task_that_retries_then_parks_is_counted_by_task_kind_and_queue(emf, app, monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)

    @app.task(base=RecoveryTask, bind=True, name="cloudwatch.always_down",
              retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=5))
    def always_down(self):
        raise DependencyError("503 from the partner")

    labels = {"task": "cloudwatch.always_down", "kind": "dependency"}
    prometheus_before = prometheus("recovery_retries_total", **labels)

    result = always_down.apply()

    assert DeadLetter.objects.get(task_id=result.id).attempts == 3
    documents = emf.documents()
    # An eager run has no routing key: its queue is "unknown", never a made-up value
    where = {"Task": "cloudwatch.always_down", "Kind": "dependency", "Queue": "unknown"}
    assert totals(documents, "TaskFailures", **where) == 3
    assert totals(documents, "Retries", **where) == 2
    assert totals(documents, "DeadLettersParked", **where) == 1
    (document,) = [d for d in documents if "TaskFailures" in d]
    assert document["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [
        ["Task", "Kind", "Queue"], ["Task"]]
    assert not any(result.id in str(value) for d in documents for value in d.values())
    # Prometheus is not listed: its counters did not move
    assert prometheus("recovery_retries_total", **labels) == prometheus_before


def test_nothing_is_counted_while_cloudwatch_is_not_listed(settings, emf):
    settings.RECOVERY = {**settings.RECOVERY, "METRICS_BACKENDS": ["prometheus"]}

    events.compensation_finished.send(outcome="failed")

    assert emf.documents() == []


def test_a_forged_task_name_and_routing_key_add_no_dimension_value(emf):
    park(letter("cw-forged", task_name="made.up.task.name", queue="made-up-queue"))
    park(letter("cw-known", queue="celery"))

    documents = emf.documents()

    assert totals(documents, "DeadLettersParked", Task="unregistered", Queue="unknown") == 1
    assert totals(documents, "DeadLettersParked", Task="unregistered", Queue="celery") == 1
    assert {d.get("Task") for d in documents} == {"unregistered"}


def test_a_letter_parked_again_after_a_replay_is_also_a_replay_outcome(emf):
    park(letter("cw-replayed", replay=1))

    assert totals(emf.documents(), "Replays", Outcome="parked_again") == 1


def test_every_other_event_is_counted_with_its_dimensions(emf):
    events.fallback_ran.send(task_name="proj.quote", reason="circuit_open", succeeded=True,
                             queue="celery")
    events.fallback_ran.send(task_name="proj.quote", reason="gave_up", succeeded=False,
                             queue="celery")
    events.internal_error.send(task_name="proj.quote", error_type="OperationalError")
    events.bookkeeping_deferred.send(kind="result")
    events.replay_finished.send(outcome="published", count=7)
    events.replay_finished.send(outcome="failed", count=0)
    events.compensation_finished.send(outcome="failed")
    events.circuit_changed.send(dependency="partner-api", state="open")
    events.worker_heartbeat.send(hostname="w1@host-7f3a")
    events.worker_heartbeat.send(hostname="w1@host-7f3a")

    documents = emf.documents()

    assert totals(documents, "Fallbacks", Task="proj.quote", Reason="circuit_open",
                  Queue="celery") == 1
    assert totals(documents, "FallbackFailures", Task="proj.quote", Reason="gave_up") == 1
    assert totals(documents, "InternalErrors", Task="proj.quote",
                  Exception="OperationalError") == 1
    assert totals(documents, "DeferredWrites", Type="result") == 1
    assert totals(documents, "Replays", Outcome="published") == 7
    assert totals(documents, "Replays", Outcome="failed") == 0
    assert totals(documents, "Compensations", Outcome="failed") == 1
    assert totals(documents, "CircuitTransitions", Dependency="partner-api", State="open") == 1
    assert totals(documents, "WorkerHeartbeats", Worker="w1") == 2


def test_a_broken_exporter_never_stops_a_letter_from_being_parked(emf, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter down")

    monkeypatch.setattr(receivers.buffer(), "add", broken)

    park(letter("cw-broken-1"))
    park(letter("cw-broken-2"))

    assert DeadLetter.objects.filter(task_id__startswith="cw-broken").count() == 2
    warnings = [r for r in caplog.records if "DeadLettersParked failed" in r.getMessage()
                and r.levelname == "WARNING"]
    assert len(warnings) == 1  # once per process, then at debug level


def test_an_invalid_setting_sends_nothing_and_never_fails_the_task(settings, emf):
    settings.RECOVERY = {**settings.RECOVERY, "CLOUDWATCH": {"NAMESPACE": "AWS/Mine"}}

    park(letter("cw-invalid"))

    assert DeadLetter.objects.filter(task_id="cw-invalid").exists()
    assert receivers.flush() == 0


def test_a_changed_setting_publishes_what_the_old_one_held_and_starts_again(settings, emf):
    events.compensation_finished.send(outcome="failed")
    first = receivers.buffer()

    settings.RECOVERY = {**settings.RECOVERY, "CLOUDWATCH": {
        **settings.RECOVERY["CLOUDWATCH"], "NAMESPACE": "Shop/Recovery"}}
    events.compensation_finished.send(outcome="succeeded")

    assert receivers.buffer() is not first
    namespaces = [d["_aws"]["CloudWatchMetrics"][0]["Namespace"] for d in emf.documents()]
    assert namespaces == ["CeleryRecovery", "Shop/Recovery"]


def test_stopping_publishes_what_is_left_and_a_later_count_starts_a_new_buffer(emf):
    events.compensation_finished.send(outcome="failed")
    first = receivers.buffer()

    receivers.stop_publishing(hostname="w1@host", timeout_seconds=1)

    assert len(emf_lines("\n".join(emf.lines))) == 1  # published by the stop itself
    events.compensation_finished.send(outcome="failed")
    assert receivers.buffer() is not first
    assert len(emf.documents()) == 2


def test_a_forked_child_starts_empty_and_publishes_nothing_of_its_parents(emf):
    events.compensation_finished.send(outcome="failed")
    assert receivers.buffer().pending()

    pid = os.fork()
    if pid == 0:  # the child: it must not see, or publish, the parent's counts
        code = 0 if receivers._process is None and receivers.flush() == 0 else 1
        os._exit(code)
    deadline = time.monotonic() + 30
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if waited[0] == 0:  # a child hung on a lock inherited from the fork: fail, never hang the run
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert waited[0] == pid and os.waitstatus_to_exitcode(waited[1]) == 0
    assert totals(emf.documents(), "Compensations", Outcome="failed") == 1


def test_a_known_queue_is_kept_by_name_or_routing_key_and_anything_else_is_unknown():
    assert receivers.queue_label("celery") == "celery"
    assert receivers.queue_label("somewhere-else") == receivers.UNKNOWN_QUEUE
    assert receivers.queue_label("") == receivers.UNKNOWN_QUEUE
    assert receivers.queue_label(None) == receivers.UNKNOWN_QUEUE
    assert receivers.worker_label("w1@host-7f3a") == "w1"
    assert receivers.worker_label("standalone") == "standalone"


def test_with_put_metric_data_the_counts_reach_cloudwatch_and_no_line_is_written(
        settings, emf, moto_cloudwatch):  # noqa: F811 - the fixture
    settings.RECOVERY = {**settings.RECOVERY, "CLOUDWATCH": {
        **settings.RECOVERY["CLOUDWATCH"], "PUT_METRIC_DATA": True,
        "REGION": moto_cloudwatch.region, "ENDPOINT_URL": moto_cloudwatch.endpoint_url,
        "NAMESPACE": "CeleryRecoveryTest"}}

    events.compensation_finished.send(outcome="failed")
    events.compensation_finished.send(outcome="failed")
    assert receivers.flush() == 1

    answer = moto_cloudwatch.client().get_metric_statistics(
        Namespace="CeleryRecoveryTest", MetricName="Compensations",
        Dimensions=[{"Name": "Outcome", "Value": "failed"}],
        StartTime=datetime.now(timezone.utc) - timedelta(minutes=10),
        EndTime=datetime.now(timezone.utc) + timedelta(minutes=10), Period=60,
        Statistics=["Sum"])
    assert sum(point["Sum"] for point in answer["Datapoints"]) == 2
    assert emf.lines == []


def test_an_interval_of_zero_writes_one_line_per_event_at_once(settings, emf):
    settings.RECOVERY = {**settings.RECOVERY, "CLOUDWATCH": {
        **settings.RECOVERY["CLOUDWATCH"], "FLUSH_INTERVAL_SECONDS": 0}}
    before = time.time()

    events.compensation_finished.send(outcome="failed")
    events.compensation_finished.send(outcome="failed")

    documents = emf_lines("\n".join(emf.lines))  # no flush asked for
    assert [d["Compensations"] for d in documents] == [1, 1]
    assert all(d["_aws"]["Timestamp"] >= int(before * 1000) for d in documents)
