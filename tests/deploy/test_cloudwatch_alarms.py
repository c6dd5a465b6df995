"""The shipped CloudWatch alarms (deploy/cloudwatch/alarms.yaml): cfn-lint accepts the
template; every Prometheus alert of deploy/prometheus/alerts.yml has an alarm of the same
name or a stated reason why CloudWatch cannot express it; each alarm links its alert's
runbook, which exists, and keeps its severity; and every metric and dimension set an alarm
reads is one the cloudwatch-emf backend sends (a renamed metric breaks this test, not the
on-call's alarms)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cfnlint.api import lint_file

from recovery.observe.cloudwatch import families
from recovery.observe.cloudwatch.emf import Family

from .test_prometheus_rules import ROOT, RUNBOOKS, alerts, kebab

TEMPLATE = ROOT / "deploy" / "cloudwatch" / "alarms.yaml"
DOCS = ROOT / "docs" / "cloudwatch.md"
RUNBOOK_LINK = re.compile(r"https://github\.com/celery-recovery/celery-recovery/blob/main/"
                          r"(docs/runbooks/alerts/[a-z0-9-]+\.md)")
INSIGHTS = re.compile(r'^SELECT SUM\((?P<metric>\w+)\) FROM SCHEMA\("\$\{Namespace\}", '
                      r'(?P<schema>[\w, ]+)\)(?: GROUP BY (?P<group>[\w, ]+))?$')
SEVERITY_TOPIC = {"critical": "CriticalTopicArn", "warning": "WarningTopicArn"}
#: Values a dimension of an alarm may name, by dimension.
KNOWN_VALUES = {"Outcome": {"published", "failed", "resolved", "parked_again",
                            "publish_failed", "succeeded"}}


def template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def alarms() -> dict[str, dict]:
    return {name: resource["Properties"] for name, resource in template()["Resources"].items()
            if resource["Type"] == "AWS::CloudWatch::Alarm"}


def without_alarm() -> dict[str, str]:
    return template()["Metadata"]["PrometheusAlertsWithoutAlarm"]


def rule(name: str) -> dict:
    (found,) = [r for r in alerts() if r["alert"] == name]
    return found


def test_cfn_lint_accepts_the_template():
    problems = lint_file(Path(TEMPLATE))

    assert [str(problem) for problem in problems] == []


def test_every_prometheus_alert_has_an_alarm_or_a_stated_reason_and_nothing_else():
    prometheus = {r["alert"] for r in alerts()}
    alarmed, explained = set(alarms()), set(without_alarm())

    assert alarmed & explained == set(), "an alert has both an alarm and a reason not to"
    assert alarmed | explained == prometheus
    assert len(alarmed) >= 5
    for name, reason in without_alarm().items():
        assert len(reason.split()) >= 10, f"{name}: say why CloudWatch cannot express it"
        assert name in template()["Description"], \
            f"{name} has no alarm: the template's Description must say so"
        assert name in DOCS.read_text(), f"{name} has no alarm: docs/cloudwatch.md must say so"


@pytest.mark.parametrize("name", sorted(alarms()))
def test_every_alarm_links_its_alerts_runbook_which_exists(name):
    description = alarms()[name]["AlarmDescription"]

    assert rule(name)["annotations"]["runbook_url"] in description
    (path,) = RUNBOOK_LINK.findall(description)
    assert (ROOT / path).is_file(), f"{path} is missing"
    assert (ROOT / path) == RUNBOOKS / f"{kebab(name)}.md"
    assert len(description) <= 1024  # CloudWatch's limit


@pytest.mark.parametrize("name", sorted(alarms()))
def test_every_alarm_keeps_its_alerts_severity_and_notifies_that_severitys_topic(name):
    properties = alarms()[name]
    severity = rule(name)["labels"]["severity"]

    assert f"Severity: {severity}." in " ".join(properties["AlarmDescription"].split())
    for actions in ("AlarmActions", "OKActions"):
        condition, (topic,), _none = properties[actions]["Fn::If"]
        assert topic == {"Ref": SEVERITY_TOPIC[severity]}
    assert properties["AlarmName"] == {"Fn::Sub": f"${{AWS::StackName}}-{name}"}


def _family(metric: str) -> Family:
    try:
        return families.by_name(metric)
    except KeyError:
        raise AssertionError(f"the alarms read {metric}, which recovery does not send") from None


@pytest.mark.parametrize("name", sorted(alarms()))
def test_every_alarm_reads_a_metric_and_dimension_set_the_backend_sends(name):
    properties = alarms()[name]
    if "MetricName" in properties:
        family = _family(properties["MetricName"])
        assert properties["Namespace"] == {"Ref": "Namespace"}
        dimensions = {d["Name"]: d["Value"] for d in properties["Dimensions"]}
        assert tuple(sorted(dimensions)) in {tuple(sorted(r)) for r in family.rollups}, \
            "CloudWatch matches a metric's dimensions exactly: use a set the backend sends"
        for dimension, value in dimensions.items():
            assert value in KNOWN_VALUES.get(dimension, {value}), (dimension, value)
        assert properties["Statistic"] == "Sum"
        return
    (query,) = properties["Metrics"]
    found = INSIGHTS.match(query["Expression"]["Fn::Sub"])
    assert found, f"not a Metrics Insights query of ours: {query['Expression']}"
    family = _family(found["metric"])
    schema = tuple(part.strip() for part in found["schema"].split(","))
    # SCHEMA(namespace, dims...) matches metrics with exactly these dimensions
    assert set(schema) in [set(rollup) for rollup in family.rollups], (schema, family.rollups)
    if found["group"]:
        assert {part.strip() for part in found["group"].split(",")} <= set(schema)
    assert query["ReturnData"] is True and query["Period"] % 60 == 0


def test_the_alarms_windows_stay_within_what_metrics_insights_evaluates():
    for name, properties in alarms().items():
        period = properties.get("Period") or properties["Metrics"][0]["Period"]
        # Metrics Insights alarms evaluate the latest 3 hours; a day for metric alarms
        assert period * properties["EvaluationPeriods"] <= 3 * 3600, name
        assert properties.get("DatapointsToAlarm", 1) <= properties["EvaluationPeriods"], name
