"""The README's first command on the embedded default: SQLite and the file broker, no server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..brokers import only_on
from .harness import ROOT, wait_for

pytestmark = [pytest.mark.integration,
              only_on("redis", reason="the demo runs on its embedded file-system broker "
                                      "whatever the matrix runs on: once is enough")]


def demo_env(var_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(RECOVERY_VAR_DIR=str(var_dir), DJANGO_SETTINGS_MODULE="config.settings",
               DEMO_ADMIN_PASSWORD="pw-for-test")
    return env


def processes_of(var_dir: Path) -> list[int]:
    """Every live process started with this demo's RECOVERY_VAR_DIR (the demo, its worker
    and the worker's children inherit it), zombies left out."""
    marker = f"RECOVERY_VAR_DIR={var_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def test_demo_runs_the_examples_on_the_embedded_default(tmp_path):
    env = demo_env(tmp_path)
    done = subprocess.run([sys.executable, "manage.py", "demo", "--no-serve", "--timeout", "120"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "SQLite (embedded)" in out and "filesystem://" in out
    assert "7 workflows: 4 succeeded, 3 parked as dead letters." in out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()
             if line.startswith(("fetch_exchange_rate", "charge_payment", "build_monthly_report"))}
    assert "succeeded after retries" in lines["fetch_exchange_rate 'EUR',"]
    assert "parked (dead letter)" in lines["build_monthly_report '2026-10'"]
    assert " 4 " in lines["build_monthly_report '2026-10'"]
    # The circuit breaker, fallback and degraded-mode examples (tasks/partners.py), with the
    # circuit and the switches in the SQLite database
    quotes = [line for line in out.splitlines() if line.startswith("fetch_partner_quote")]
    assert "partner quote" in quotes[0]
    assert "backup quote: partner failed 3 attempts (503)" in quotes[1]
    assert "backup quote: circuit open, partner not called" in quotes[2]
    reports = [line for line in out.splitlines() if line.startswith("sales_report")]
    assert "live figures, cached" in reports[0] and "(read-only mode)" in reports[1]
    assert "Circuit partner-api: open" in out
    # charge_payment is critical: its dead letter opened an incident on the embedded default
    assert "critical critical_task        Critical task tasks.tasks.charge_payment failed" in out
    # The rehearsal of the order saga: payment failed on purpose, both orders compensated,
    # the report printed
    assert "Rehearsal of the order saga: payment fails permanently for 30 s" in out
    assert "2 runs hit in 2 tasks: 2 compensated" in out
    hit = [line for line in out.splitlines() if line.startswith("saga-") and "charge_payment" in line]
    assert len(hit) == 2 and all(" compensated " in line for line in hit)
    assert (tmp_path / "demo.sqlite3").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("signum, when", [
    (signal.SIGTERM, "running the workflows"),
    (signal.SIGHUP, "serving the admin"),
    (signal.SIGKILL, "serving the admin"),
], ids=["SIGTERM-while-running", "SIGHUP-while-serving", "SIGKILL-while-serving"])
def test_the_demos_worker_is_stopped_however_the_demo_ends(tmp_path, signum, when):
    # Given the demo, started as a terminal or CI would, with its worker up
    output = tmp_path / "demo.out"
    with open(output, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "manage.py", "demo", "--timeout", "120",
             "--addrport", f"127.0.0.1:{_free_port()}"],
            cwd=ROOT, env=demo_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        worker_log = tmp_path / "demo-worker.log"
        wait_for(lambda: worker_log.exists() and " ready." in worker_log.read_text(), 90,
                 message="the demo's worker to be ready")
        if when == "serving the admin":
            wait_for(lambda: "Admin: http://" in output.read_text(), 150,
                     message="the demo to serve the admin")
        assert len(processes_of(tmp_path)) >= 2
        # When the demo gets the signal
        demo.send_signal(signum)
        demo.wait(timeout=30)
        # Then within seconds no process of the demo is left: its worker and the
        # worker's children are gone too
        wait_for(lambda: not processes_of(tmp_path), 20,
                 message=f"the worker to stop after {signal.Signals(signum).name}")
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in processes_of(tmp_path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
