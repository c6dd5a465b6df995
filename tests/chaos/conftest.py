"""Fixtures of the chaos suite: private PostgreSQL and Redis, the hanging proxy in front
of PostgreSQL, and a worker factory; and the hook that prints the suite's table at the
end of the pytest run, so it shows in ``make test`` output without ``-s``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from tests.integration.harness import ROOT, Worker

from .report import REPORTS
from .services import HangingProxy, Postgres, RedisServer


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for report in REPORTS:
        terminalreporter.section("chaos suite")
        terminalreporter.write_line(report)


def _env(**values: str) -> dict:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RECOVERY_", "TEST_", "CELERY_", "CHAOS_"))}
    return {**base, **values}


@pytest.fixture
def chaos(request):
    """Everything the storm needs, torn down on every exit path. The temporary directory
    is kept when the test failed (logs, spool, side-effect files), and named in the report."""
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    root.chmod(0o755)  # the postgres user must reach its data directory below
    started: list = []
    workers: list[Worker] = []
    try:
        pg = Postgres(root)
        started.append(pg)
        pg.start()
        with psycopg.connect(pg.url(database="postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE chaos")
        broker = RedisServer(root)
        started.append(broker)
        broker.start()
        proxy = HangingProxy("127.0.0.1", pg.port)
        started.append(proxy)
        for name in ("spool", "effects", "var", "logs"):
            (root / name).mkdir()
        max_deliveries = int(os.environ.get("CHAOS_MAX_DELIVERIES", 8))
        env = _env(
            DJANGO_SETTINGS_MODULE="tests.settings",
            TEST_DATABASE_URL=pg.url(proxy.port),
            CELERY_BROKER_URL=broker.url,
            TEST_BROKER_URL=broker.url,
            RECOVERY_SPOOL_DIR=str(root / "spool"),
            RECOVERY_VAR_DIR=str(root / "var"),
            RECOVERY_MAX_DELIVERIES=str(max_deliveries),
            RECOVERY_VISIBILITY_TIMEOUT_SECONDS="12",
            CHAOS_EFFECTS_DIR=str(root / "effects"),
            PYTHONUNBUFFERED="1",
        )
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
                       cwd=ROOT, env={**env, "TEST_DATABASE_URL": pg.url()}, check=True,
                       timeout=300)

        def start_worker(name: str) -> Worker:
            worker = Worker(name, root / "logs", env, concurrency=2,
                            extra=("-I", "tests.integration.worker_tasks,"
                                         "tests.chaos.chaos_tasks"))
            workers.append(worker)
            return worker.wait_ready(timeout=180)

        yield SimpleNamespace(root=root, pg=pg, broker=broker, proxy=proxy, env=env,
                              start_worker=start_worker, workers=workers,
                              spool=root / "spool", effects=root / "effects",
                              max_deliveries=max_deliveries)
    finally:
        for worker in workers:
            try:
                worker.stop()
            except Exception:  # noqa: BLE001 - tear down the rest regardless
                worker.kill_everything()
        for service in reversed(started):
            service.close() if isinstance(service, HangingProxy) else service.stop()
        failed = getattr(request.node, "chaos_failed", True)
        if failed or os.environ.get("CHAOS_KEEP"):
            REPORTS.append(f"chaos: logs, spool and side-effect files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.chaos_failed = report.failed
