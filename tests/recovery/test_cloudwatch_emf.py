"""recovery.observe.cloudwatch.emf and .families: counts become valid EMF documents (checked
by a JSON schema of the specification and by aws-embedded-metrics), grouped by dimensions,
cut under the 100-metric limit, and the same sums as PutMetricData data."""

from __future__ import annotations

import json

import pytest

from recovery.observe.cloudwatch import emf, families
from recovery.observe.cloudwatch.emf import Family

from .emf_spec import check_document, totals

NAMESPACE = "CeleryRecovery"
AT_MS = 1_760_000_000_123


def key(family: Family, *values: str) -> emf.Key:
    return family, tuple(values)


def test_a_tasks_failures_retries_and_letters_share_one_document_per_kind_and_queue():
    counts = {
        key(families.TASK_FAILURES, "shop.charge", "dependency", "celery"): 4,
        key(families.RETRIES, "shop.charge", "dependency", "celery"): 3,
        key(families.DEAD_LETTERS_PARKED, "shop.charge", "dependency", "celery"): 1,
        key(families.TASK_FAILURES, "shop.charge", "timeout", "celery"): 2,
        key(families.REPLAYS, "parked_again"): 5,
    }

    documents = emf.documents(counts, NAMESPACE, AT_MS)

    for document in documents:
        check_document(document)
    assert len(documents) == 3
    (charge,) = [d for d in documents if d.get("Kind") == "dependency"]
    assert charge == {
        "Task": "shop.charge", "Kind": "dependency", "Queue": "celery",
        "DeadLettersParked": 1, "Retries": 3, "TaskFailures": 4,
        "_aws": {"Timestamp": AT_MS, "CloudWatchMetrics": [{
            "Namespace": NAMESPACE,
            "Dimensions": [["Task", "Kind", "Queue"], ["Task"]],
            "Metrics": [{"Name": "DeadLettersParked", "Unit": "Count"},
                        {"Name": "Retries", "Unit": "Count"},
                        {"Name": "TaskFailures", "Unit": "Count"}],
        }]},
    }
    assert totals(documents, "TaskFailures", Task="shop.charge") == 6
    assert totals(documents, "Replays", Outcome="parked_again") == 5


def test_more_than_100_metrics_of_one_dimension_set_are_cut_into_several_documents():
    many = [Family(f"Metric{n:03}", ("Task",), (("Task",),)) for n in range(250)]
    counts = {key(family, "shop.charge"): n + 1 for n, family in enumerate(many)}

    documents = emf.documents(counts, NAMESPACE, AT_MS)

    assert [len(d["_aws"]["CloudWatchMetrics"][0]["Metrics"]) for d in documents] == [100, 100, 50]
    for document in documents:
        check_document(document)
    assert sum(totals(documents, family.name) for family in many) == sum(range(1, 251))


def test_every_family_writes_a_valid_document():
    counts = {key(family, *(f"{name.lower()}-value" for name in family.dimensions)): 1
              for family in families.ALL}

    documents = emf.documents(counts, NAMESPACE, AT_MS)

    assert {name for d in documents for name in d if name[0].isupper() and name not in
            ("Task", "Kind", "Queue", "Reason", "Exception", "Type", "Outcome", "Dependency",
             "State", "Worker")} == {family.name for family in families.ALL}
    for document in documents:
        check_document(document)


def test_the_document_is_one_json_line_of_plain_ascii():
    counts = {key(families.RETRIES, "shop.charge", "dependency", "celery"): 1}

    (document,) = emf.documents(counts, NAMESPACE, AT_MS)
    line = json.dumps(document, separators=(",", ":"))

    assert "\n" not in line and line.isascii()
    check_document(json.loads(line))


@pytest.mark.parametrize("raw, shown", [
    ("shop.charge", "shop.charge"),
    ("", emf.EMPTY_DIMENSION_VALUE),
    ("   ", emf.EMPTY_DIMENSION_VALUE),
    (None, emf.EMPTY_DIMENSION_VALUE),
    ("café.charge", "caf?.charge"),
    ("x" * 2000, "x" * 1024),
])
def test_a_dimension_value_is_ascii_bounded_and_never_empty(raw, shown):
    assert emf.dimension_value(raw) == shown


def test_metric_data_sums_each_dimension_set_as_cloudwatch_would_extract_them():
    counts = {
        key(families.TASK_FAILURES, "shop.charge", "dependency", "celery"): 4,
        key(families.TASK_FAILURES, "shop.charge", "timeout", "priority"): 2,
        key(families.COMPENSATIONS, "failed"): 1,
    }

    data = emf.metric_data(counts, 1_760_000_000.0)

    by_dimensions = {(d["MetricName"], tuple((x["Name"], x["Value"]) for x in d["Dimensions"])):
                     d["Value"] for d in data}
    assert by_dimensions == {
        ("TaskFailures", (("Task", "shop.charge"), ("Kind", "dependency"), ("Queue", "celery"))): 4,
        ("TaskFailures", (("Task", "shop.charge"), ("Kind", "timeout"), ("Queue", "priority"))): 2,
        ("TaskFailures", (("Task", "shop.charge"),)): 6,
        ("Compensations", (("Outcome", "failed"),)): 1,
    }
    assert {d["Unit"] for d in data} == {"Count"}
    assert {d["Timestamp"].timestamp() for d in data} == {1_760_000_000.0}


@pytest.mark.parametrize("namespace, valid", [
    ("CeleryRecovery", True), ("shop/prod-eu_1.recovery#a:b", True), ("", False),
    ("AWS/Recovery", False), ("has space", False), ("é", False), ("x" * 256, False), (None, False),
])
def test_a_namespace_is_one_cloudwatch_accepts(namespace, valid):
    assert emf.valid_namespace(namespace) is valid


@pytest.mark.parametrize("rollups, message", [
    ((), "at least one dimension set"),
    (((),), "1 to 30 names"),
    ((("Task", "Nope"),), "does not carry"),
    ((tuple(f"D{n}" for n in range(31)),), "1 to 30 names"),
])
def test_a_family_refuses_dimension_sets_cloudwatch_or_its_own_dimensions_would_not(
        rollups, message):
    with pytest.raises(ValueError, match=message):
        Family("Broken", ("Task", *(f"D{n}" for n in range(31))), rollups)


def test_every_family_counts_an_event_the_prometheus_counters_count_and_no_task_id():
    prometheus = {family.prometheus for family in families.ALL}
    assert {"recovery_task_failures_total", "recovery_retries_total",
            "recovery_dead_letters_parked_total", "recovery_replays_total",
            "recovery_compensations_total", "recovery_fallbacks_total",
            "recovery_circuit_transitions_total"} <= prometheus
    names = [family.name for family in families.ALL]
    assert len(names) == len(set(names))
    for family in families.ALL:
        assert not {"TaskId", "Id", "TaskID"} & set(family.dimensions)
        assert families.by_name(family.name) is family


def _broken(change) -> dict:
    document = {"Task": "shop.charge", "Retries": 1, "_aws": {"Timestamp": AT_MS, "CloudWatchMetrics": [{
        "Namespace": NAMESPACE, "Dimensions": [["Task"]], "Metrics": [{"Name": "Retries", "Unit": "Count"}]}]}}
    change(document)
    return document


@pytest.mark.parametrize("change", [
    pytest.param(lambda d: d.pop("Task"), id="dimension-not-a-member"),
    pytest.param(lambda d: d.update(Retries="1"), id="value-not-a-number"),
    pytest.param(lambda d: d.update(Retries=list(range(101))), id="over-100-values"),
    pytest.param(lambda d: d["_aws"].update(Timestamp=1.5), id="timestamp-not-integer-ms"),
    pytest.param(lambda d: d.update(Task="café"), id="dimension-not-ascii"),
    pytest.param(lambda d: d["_aws"]["CloudWatchMetrics"][0]["Metrics"][0].update(Unit="Things"),
                 id="unknown-unit"),
    pytest.param(lambda d: d["_aws"]["CloudWatchMetrics"][0].update(
        Dimensions=[[f"D{n}" for n in range(31)]]) or d.update({f"D{n}": "v" for n in range(31)}),
        id="31-dimensions"),
    pytest.param(lambda d: d["_aws"]["CloudWatchMetrics"][0].update(
        Metrics=[{"Name": f"M{n}", "Unit": "Count"} for n in range(101)])
        or d.update({f"M{n}": 1 for n in range(101)}), id="101-metrics"),
])
def test_the_specification_check_refuses_what_cloudwatch_would_refuse(change):
    with pytest.raises(Exception):  # noqa: B017 - either judge may be the one to refuse
        check_document(_broken(change))
