"""The README's first command on the embedded default: SQLite and the file broker, no server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .harness import ROOT

pytestmark = pytest.mark.integration


def test_demo_runs_the_examples_on_the_embedded_default(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(RECOVERY_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings",
               DEMO_ADMIN_PASSWORD="pw-for-test")
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
    assert (tmp_path / "demo.sqlite3").exists()
