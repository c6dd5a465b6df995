"""Prometheus metrics from a real prefork worker: every pool child's counts, recycled
children included, summed on the worker's endpoint with the worker's heartbeat, in a format
promtool accepts."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
import requests
from celery import states
from prometheus_client.parser import text_string_to_metric_families

from recovery.models import DeadLetter

from . import worker_tasks as t
from .harness import wait_for
from ..brokers import broker_independent

pytestmark = [pytest.mark.integration, broker_independent]  # metrics exposition


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> str:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return response.text


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool") or ("/usr/bin/promtool"
                                            if os.path.exists("/usr/bin/promtool") else None)
    assert promtool, ("promtool is missing: run scripts/ensure-services.sh "
                      "(apt-get install prometheus)")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"


def test_counts_from_every_pool_child_are_summed_on_the_worker_endpoint(start_worker, store, key):
    # Given a prefork worker with two children, recycled every two tasks, serving metrics
    # (and no PROMETHEUS_MULTIPROC_DIR: it makes its own)
    port = free_port()
    worker = start_worker(env={"RECOVERY_METRICS_PORT": str(port),
                               "PROMETHEUS_MULTIPROC_DIR": ""},
                          concurrency=2, extra=("--max-tasks-per-child", "2"))
    private_dirs = glob.glob(os.path.join(tempfile.gettempdir(),
                                          f"recovery-metrics-{worker.process.pid}-*"))
    assert len(private_dirs) == 1, private_dirs

    # When tasks fail, retry and park across many children:
    # 4 x always transient (4 attempts: 3 retries, then parked as a timeout),
    # 3 x declined (permanent: parked at once), 2 x transient twice then success
    transient = [t.always_transient.delay(f"{key}-a{n}") for n in range(4)]
    declined = [t.declined.delay(f"{key}-d{n}", n) for n in range(3)]
    flaky = [t.flaky_twice.delay(f"{key}-f{n}") for n in range(2)]
    for result in flaky:
        assert result.get(timeout=60) == 3
    parked_ids = {r.id for r in transient + declined}
    wait_for(lambda: DeadLetter.objects.filter(task_id__in=parked_ids).count() == 7, 90,
             message="seven dead letters")

    # Then the worker's endpoint sums them exactly, whichever child did the work
    always = "tests.integration.worker_tasks.always_transient"
    refused = "tests.integration.worker_tasks.declined"
    flaky_name = "tests.integration.worker_tasks.flaky_twice"
    expected = {
        ("recovery_task_failures_total", always, "timeout", "true"): 16,
        ("recovery_task_failures_total", refused, "dependency", "false"): 3,
        ("recovery_task_failures_total", flaky_name, "dependency", "true"): 4,
    }

    def settled():
        found = samples(scrape(port))
        return found if value(found, "recovery_dead_letters_parked_total", task=always,
                              kind="timeout") == 4 and value(
            found, "recovery_dead_letters_parked_total", task=refused, kind="dependency") == 3 \
            else None

    found = wait_for(settled, 30, message="parked counters on the worker endpoint")
    for (name, task, kind, transient_label), count in expected.items():
        assert value(found, name, task=task, kind=kind, transient=transient_label) == count, \
            (name, task, kind, transient_label)
    assert value(found, "recovery_task_failures_total", task=always, kind="timeout",
                 transient="false") == 0
    assert value(found, "recovery_retries_total", task=always, kind="timeout") == 12
    assert value(found, "recovery_retries_total", task=flaky_name, kind="dependency") == 4
    assert value(found, "recovery_retries_total", task=refused, kind="dependency") == 0
    assert value(found, "recovery_dead_letters_parked_total", task=always, kind="timeout") == 4
    assert value(found, "recovery_dead_letters_parked_total", task=refused,
                 kind="dependency") == 3
    assert value(found, "recovery_dead_letters_parked_total", task=flaky_name,
                 kind="dependency") == 0
    assert value(found, "recovery_spool_backlog") == 0
    # ... with the heartbeat of the worker's main process, named by its Celery hostname
    beats = {dict(labels)["worker"]: beat for (name, labels), beat in found.items()
             if name == "recovery_worker_heartbeat_timestamp_seconds"}
    assert len(beats) == 1 and next(iter(beats)).startswith("w1@"), beats
    assert time.time() - 120 < next(iter(beats.values())) <= time.time() + 1
    for result in transient + declined:
        assert result.state == states.FAILURE

    # ... the work really was spread over several children, most of them since recycled
    failing = set()  # children that ran an attempt that failed, so recorded a metric
    for n in range(4):
        failing |= {int(p) for p in store.lrange(f"t:pids:{key}-a{n}", 0, -1)}
    for n in range(3):
        failing |= {int(p) for p in store.lrange(f"t:pids:{key}-d{n}", 0, -1)}
    pids = set(failing)
    for n in range(2):  # flaky-twice's third run succeeds: it records nothing
        pids |= {int(p) for p in store.lrange(f"t:pids:{key}-f{n}", 0, -1)}
    assert len(pids) >= 5, pids
    live = set(worker.child_pids())
    assert pids - live, "no recycled child ran a task"
    files = glob.glob(os.path.join(private_dirs[0], "counter_*.db"))
    assert {int(os.path.basename(f)[len("counter_"):-3]) for f in files} >= failing

    # ... and the exposition is valid for Prometheus
    promtool_check(scrape(port))

    # When the worker stops, its private directory goes with it
    worker.stop()
    assert not os.path.exists(private_dirs[0])


def test_the_django_view_sums_a_workers_counts_through_a_shared_directory(
        start_worker, store, key, client, tmp_path, monkeypatch):
    # Given a worker and the web process sharing PROMETHEUS_MULTIPROC_DIR
    shared = tmp_path / "prometheus"
    shared.mkdir()
    start_worker(env={"PROMETHEUS_MULTIPROC_DIR": str(shared)}, concurrency=2)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))

    # When two tasks are parked
    results = [t.declined.delay(f"{key}-{n}", n) for n in range(2)]
    wait_for(lambda: DeadLetter.objects.filter(task_id__in=[r.id for r in results]).count() == 2,
             60, message="two dead letters")

    # Then the view shows the worker's counters and the database backlog, valid for Prometheus
    refused = "tests.integration.worker_tasks.declined"

    def scraped():
        text = client.get("/metrics").content.decode()
        found = samples(text)
        return (text, found) if value(found, "recovery_dead_letters_parked_total",
                                      task=refused, kind="dependency") == 2 else None

    text, found = wait_for(scraped, 30, message="parked counter on the Django view")
    assert value(found, "recovery_task_failures_total", task=refused, kind="dependency",
                 transient="false") == 2
    assert value(found, "recovery_dead_letters", status="parked") == 2
    assert value(found, "recovery_collector_up", source="database") == 1
    assert any(name == "recovery_worker_heartbeat_timestamp_seconds" for name, _ in found), \
        "the worker's heartbeat is not on the view"
    promtool_check(text)
