"""recovery.observe.cloudwatch.sinks: EMF documents go out as bare JSON lines on the
process's standard output (or the project's own handlers), and PutMetricData sends the
same sums to a CloudWatch (moto's server) that gives them back."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from recovery.observe.cloudwatch import families
from recovery.observe.cloudwatch.emf import Unsent
from recovery.observe.cloudwatch.options import CloudWatchOptions
from recovery.observe.cloudwatch.sinks import LogSink, PutMetricDataSink, emf_logger, sink_for

from .emf_spec import check_document, emf_lines, totals
from .moto_cloudwatch import moto_cloudwatch  # noqa: F401 - a fixture

CHARGE = ("shop.charge", "dependency", "celery")


@pytest.fixture
def logger_name(request):
    """A logger of this test only, without handlers, forgotten afterwards."""
    name = f"tests.emf.{request.node.name}"
    yield name
    found = logging.getLogger(name)
    for handler in list(found.handlers):
        found.removeHandler(handler)


def test_emf_lines_are_bare_json_on_the_processes_real_standard_output(logger_name, capfd,
                                                                        monkeypatch):
    # Given a Celery worker's stdout proxy in place of sys.stdout, which would prefix lines
    proxy = io.StringIO()
    monkeypatch.setattr(sys, "stdout", proxy)
    sink = LogSink(CloudWatchOptions(logger=logger_name, namespace="Shop/Recovery"))

    sink({(families.TASK_FAILURES, CHARGE): 3, (families.RETRIES, CHARGE): 2}, 1_760_000_000.5)

    out = capfd.readouterr().out
    (line,) = out.splitlines()
    document = json.loads(line)  # the whole line is the document: nothing before or after
    check_document(document)
    assert document["_aws"]["Timestamp"] == 1_760_000_000_500
    assert document["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Shop/Recovery"
    assert (document["TaskFailures"], document["Retries"]) == (3, 2)
    assert logging.getLogger(logger_name).propagate is False
    assert proxy.getvalue() == ""


def test_a_logger_the_project_configured_is_used_as_it_is(logger_name, capfd):
    # Given the project's own handler on the EMF logger (e.g. a file the agent tails)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    configured = logging.getLogger(logger_name)
    configured.addHandler(Keep())

    LogSink(CloudWatchOptions(logger=logger_name))({(families.COMPENSATIONS, ("failed",)): 1}, 1.0)

    assert emf_logger(logger_name).handlers == configured.handlers
    assert len(emf_lines("\n".join(lines))) == 1
    assert capfd.readouterr().out == ""


def test_put_metric_data_sends_every_dimension_set_and_cloudwatch_returns_the_sums(
        moto_cloudwatch):  # noqa: F811 - the fixture
    options = CloudWatchOptions(put_metric_data=True, namespace="CeleryRecoveryTest",
                                region=moto_cloudwatch.region,
                                endpoint_url=moto_cloudwatch.endpoint_url)
    sink = sink_for(options)
    assert isinstance(sink, PutMetricDataSink)
    now = time.time()

    sink({(families.TASK_FAILURES, CHARGE): 4,
          (families.TASK_FAILURES, ("shop.charge", "timeout", "priority")): 2,
          (families.DEAD_LETTERS_PARKED, CHARGE): 1,
          (families.COMPENSATIONS, ("failed",)): 3}, now)

    cloudwatch = moto_cloudwatch.client()
    since = datetime.now(timezone.utc) - timedelta(minutes=10)
    until = datetime.now(timezone.utc) + timedelta(minutes=10)

    def statistics(metric: str, **dimensions: str) -> float:
        answer = cloudwatch.get_metric_statistics(
            Namespace="CeleryRecoveryTest", MetricName=metric,
            Dimensions=[{"Name": k, "Value": v} for k, v in dimensions.items()],
            StartTime=since, EndTime=until, Period=60, Statistics=["Sum"])
        return sum(point["Sum"] for point in answer["Datapoints"])

    def exactly(metric: str, **dimensions: str) -> float:
        # moto's get_metric_statistics also sums metrics with *more* dimensions than asked
        # (CloudWatch does not); GetMetricData matches the dimension set exactly in both.
        answer = cloudwatch.get_metric_data(
            StartTime=since, EndTime=until,
            MetricDataQueries=[{"Id": "m", "MetricStat": {"Period": 60, "Stat": "Sum", "Metric": {
                "Namespace": "CeleryRecoveryTest", "MetricName": metric,
                "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()]}}}])
        return sum(answer["MetricDataResults"][0]["Values"])

    assert statistics("TaskFailures", Task="shop.charge", Kind="dependency", Queue="celery") == 4
    assert statistics("TaskFailures", Task="shop.charge", Kind="timeout", Queue="priority") == 2
    assert statistics("DeadLettersParked", Task="shop.charge", Kind="dependency",
                      Queue="celery") == 1
    assert statistics("Compensations", Outcome="failed") == 3
    assert statistics("Retries", Task="shop.charge") == 0
    assert exactly("TaskFailures", Task="shop.charge") == 6  # the per-task set the alarms read
    assert exactly("DeadLettersParked", Task="shop.charge") == 1
    listed = {(m["MetricName"], tuple(sorted(d["Name"] for d in m["Dimensions"])))
              for m in cloudwatch.list_metrics(Namespace="CeleryRecoveryTest")["Metrics"]}
    assert listed == {("TaskFailures", ("Kind", "Queue", "Task")), ("TaskFailures", ("Task",)),
                      ("DeadLettersParked", ("Kind", "Queue", "Task")),
                      ("DeadLettersParked", ("Task",)), ("Compensations", ("Outcome",))}


class FailingSecondRequest:
    """A CloudWatch client whose second PutMetricData fails."""

    def __init__(self) -> None:
        self.requests: list[list[dict]] = []

    def put_metric_data(self, Namespace, MetricData):  # noqa: N803 - boto3's names
        self.requests.append(MetricData)
        if len(self.requests) == 2:
            raise ConnectionError("reset by peer")


def test_a_large_flush_is_sent_in_requests_of_at_most_1000_and_what_failed_is_unsent():
    client = FailingSecondRequest()
    sink = PutMetricDataSink(CloudWatchOptions(put_metric_data=True), client=client)
    # 700 tasks x 2 dimension sets = 1400 data: two requests
    counts = {(families.RETRIES, (f"shop.task{n}", "dependency", "celery")): 1
              for n in range(700)}

    with pytest.raises(Unsent) as unsent:
        sink(counts, time.time())

    assert [len(request) for request in client.requests] == [1000, 400]
    assert len(unsent.value.counts) == 200  # the second request's 200 series
    assert set(unsent.value.counts) <= set(counts)
    sent_tasks = {datum["Dimensions"][0]["Value"] for datum in client.requests[0]}
    assert len(sent_tasks) == 500
    assert not sent_tasks & {values[0] for _, values in unsent.value.counts}


def test_the_log_sink_writes_what_put_metric_data_would_send(logger_name, capfd):
    counts = {(families.FALLBACKS, ("shop.quote", "circuit_open", "celery")): 2,
              (families.CIRCUIT_TRANSITIONS, ("partner-api", "open")): 1}

    LogSink(CloudWatchOptions(logger=logger_name))(counts, 10.0)

    documents = emf_lines(capfd.readouterr().out)
    assert totals(documents, "Fallbacks", Task="shop.quote", Reason="circuit_open") == 2
    assert totals(documents, "CircuitTransitions", Dependency="partner-api", State="open") == 1
