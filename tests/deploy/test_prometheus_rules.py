"""The shipped monitoring: deploy/prometheus/alerts.yml passes `promtool check rules` and its
own `promtool test rules` cases, every alert has a runbook and a case that fires it, the
Grafana dashboard's queries are valid PromQL, and every metric both read is one the code
exposes (a renamed metric breaks this test, not the on-call's alerts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from recovery.observe import backlogs, metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "celery-recovery.json"
RUNBOOKS = ROOT / "docs" / "runbooks" / "alerts"
RUNBOOK_INDEX = ROOT / "docs" / "runbooks" / "README.md"
RUNBOOK_URL = ("https://github.com/celery-recovery/celery-recovery/blob/main/"
               "docs/runbooks/alerts/")
METRIC_NAME = re.compile(r"\brecovery_[a-z0-9_]+\b")
# Grafana's interval variables stand for a duration; every other variable ($job, $task) is
# used inside a regex matcher.
GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool"
                                        if os.path.exists("/usr/bin/promtool") else None)
    assert path, ("promtool is missing: run scripts/ensure-services.sh "
                  "(apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    output = f"$ promtool {' '.join(args)}\n{done.stdout}{done.stderr}"
    print(output)
    assert done.returncode == 0, output
    return output


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def kebab(name: str) -> str:
    """RecoveryCompensationFailed -> recovery-compensation-failed"""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def dashboard_panels() -> list[dict]:
    """Every panel, rows' nested ones included, rows themselves excluded."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            if panel.get("type") == "row":
                walk(panel.get("panels", []))
            else:
                found.append(panel)

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title + ref id, expr) of every query of the dashboard and its variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [(f"{panel['title']} {target['refId']}", target["expr"])
             for panel in dashboard_panels() for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append((f"variable {variable['name']}",
                          query["query"] if isinstance(query, dict) else query))
    return exprs


def concrete(expr: str) -> str:
    """A Grafana expr with its variables replaced by values Prometheus accepts."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_DURATIONS.get(m.group(1), ".*"), expr)


# -- the rules ----------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    output = run_promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert f"SUCCESS: {len(alerts())} rules found" in output


def test_the_alert_rules_pass_their_promtool_unit_tests():
    run_promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_the_required_alerts_are_shipped():
    names = {rule["alert"] for rule in alerts()}
    assert {
        "RecoveryPermanentFailureRateHigh", "RecoveryDeadLetterQueueGrowing",
        "RecoveryOldestDeadLetterTooOld", "RecoveryCircuitOpenTooLong",
        "RecoveryCompensationFailed", "RecoveryReplayFailingAgain",
        "RecoveryWorkerHeartbeatMissing", "RecoveryNoWorkerHeartbeat",
    } <= names
    assert len(names) == len(alerts()), "two alerts share a name"


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_has_a_for_a_severity_and_templated_annotations(rule):
    assert "for" in rule
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    if not rule["expr"].lstrip().startswith("absent("):  # absent() has no labels to name
        assert "{{" in annotations["summary"] + annotations["description"], \
            "say which task, worker or value: template the summary or description"


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_links_its_own_runbook_which_exists(rule):
    runbook = RUNBOOKS / f"{kebab(rule['alert'])}.md"
    assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_URL}{runbook.name}"
    assert runbook.is_file(), f"{runbook.relative_to(ROOT)} is missing"
    text = runbook.read_text()
    assert rule["alert"] in text.split("\n", 1)[0], "the runbook's title names its alert"
    for section in ("## What it means", "## Confirm it", "## What to do", "## Escalate"):
        assert section in text, f"{runbook.name} has no '{section}' section"
    assert f"alerts/{runbook.name}" in RUNBOOK_INDEX.read_text(), \
        "docs/runbooks/README.md does not list it"


def test_every_runbook_belongs_to_an_alert():
    expected = {f"{kebab(rule['alert'])}.md" for rule in alerts()}
    assert {path.name for path in RUNBOOKS.glob("*.md")} == expected


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_fires_in_a_unit_test_case_and_stays_quiet_in_another(rule):
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["alertname"] == rule["alert"]]
    firing = [case for case in cases if case.get("exp_alerts")]
    assert firing, f"no case in {RULE_TESTS.name} fires {rule['alert']}"
    assert any(not case.get("exp_alerts") for case in cases), \
        f"no case in {RULE_TESTS.name} expects {rule['alert']} to stay quiet"
    for case in firing:
        for alert in case["exp_alerts"]:
            assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
            assert set(alert["exp_annotations"]) == set(rule["annotations"])


# -- the dashboard ------------------------------------------------------------------------


def test_every_dashboard_panel_queries_prometheus_through_the_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36
    assert {v["name"] for v in board["templating"]["list"]} >= {"DS_PROMETHEUS", "job", "task"}
    panels = dashboard_panels()
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has an empty expr"
    ids = [panel["id"] for panel in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids)), "two panels share an id"


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    # Given every panel's expr, with Grafana's variables made concrete
    rules = [{"record": f"dashboard:query_{n}", "expr": concrete(expr)}
             for n, (_where, expr) in enumerate(dashboard_exprs())
             if not expr.startswith("label_values(")]
    assert rules
    path = tmp_path / "dashboard-rules.yml"
    # JSON is YAML: no quoting rules to get wrong
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))

    # Then promtool parses every one as a recording rule
    output = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in output


# -- the metrics both read ----------------------------------------------------------------


@pytest.fixture
def exposed_metric_names(monkeypatch, db) -> set[str]:
    """The metric names of a real scrape of the Django view's registry (in this process: no
    multiprocess directory), once every metric the code declares has a sample."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(metrics.MULTIPROC_ENV.lower(), raising=False)
    for key, (_name, kind, _help, labels, _mode) in metrics._SPECS.items():
        child = metrics._metric(key).labels(*["deploy-test"] * len(labels))
        child.inc() if kind == "counter" else child.set(1)
    body, _content_type = backlogs.exposition()
    text = body.decode()
    assert 'recovery_collector_up{source="database"} 1.0' in text
    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples}


def test_the_rules_read_only_metrics_the_code_exposes(exposed_metric_names):
    used = {name for rule in alerts() for name in METRIC_NAME.findall(rule["expr"])}
    assert "recovery_worker_heartbeat_timestamp_seconds" in used
    assert used - exposed_metric_names == set(), "alerts.yml reads metrics nothing exposes"


def test_the_dashboard_reads_only_metrics_the_code_exposes(exposed_metric_names):
    used = {name for _where, expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 15
    assert used - exposed_metric_names == set(), \
        "deploy/grafana/celery-recovery.json reads metrics nothing exposes"
