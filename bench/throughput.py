"""Throughput of RecoveryTask against plain Celery, measured in one run on the same Redis.

Scenarios (N tasks each, pre-queued, then one worker drains them):
  success  - no-op tasks: plain celery.Task vs RecoveryTask
  retry    - fail once then succeed: Celery autoretry_for vs RecoveryTask's policy
  park     - fail permanently: django-celery-results storing FAILURE vs RecoveryTask parking
             a dead letter with its FAILURE result
Throughput is (N - 1) / (last date_done - first date_done) from the result backend, so
worker start-up is not counted. Sides alternate (and swap who goes first) for ROUNDS
rounds; the median round of each side counts.

Usage: python bench/throughput.py [--n 2000] [--rounds 2] [--concurrency 2]
Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/celery_recovery_bench),
BENCH_BROKER_URL (default redis://127.0.0.1:6379/12).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/celery_recovery_bench")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
os.environ["DATABASE_URL"] = DB_URL
os.environ["CELERY_BROKER_URL"] = BROKER_URL
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

SCENARIOS = {
    "success": ("bench.noop_plain", "bench.noop_recovery"),
    "retry": ("bench.retry_plain", "bench.retry_recovery"),
    "park": ("bench.fail_plain", "bench.fail_recovery"),
}
TARGETS = {"success": 0.97, "retry": 1.0, "park": 1.0}


def ensure_database() -> None:
    import psycopg

    name = DB_URL.rsplit("/", 1)[1]
    admin = DB_URL.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def run_side(task_name: str, n: int, concurrency: int, with_recovery: bool) -> float:
    import redis
    from django.db import connection
    from django_celery_results.models import TaskResult

    from bench.bench_app import app
    from recovery.models import DeadLetter

    with connection.cursor() as cursor:  # TRUNCATE: no dead tuples left to slow the next run
        cursor.execute(f"TRUNCATE {TaskResult._meta.db_table}, {DeadLetter._meta.db_table}")
    redis.Redis.from_url(BROKER_URL).flushdb()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(task_name, args=(i,), producer=producer)
    connection.close()
    env = {**os.environ, "BENCH_RECOVERY": "1" if with_recovery else "0"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.bench_app:app", "worker", "-Q", "bench",
         "-P", "prefork", "-c", str(concurrency), "-l", "ERROR", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            done = TaskResult.objects.filter(task_name=task_name, status__in=("SUCCESS", "FAILURE")).count()
            if done >= n:
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"{task_name}: only {done}/{n} finished")
            time.sleep(0.5)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    stamps = TaskResult.objects.filter(task_name=task_name).order_by("date_done").values_list("date_done", flat=True)
    first, last = stamps.first(), stamps.last()
    if with_recovery and task_name == "bench.fail_recovery":
        parked = DeadLetter.objects.count()
        if parked != n:
            raise SystemExit(f"expected {n} dead letters, found {parked}")
    return (n - 1) / max(1e-9, (last - first).total_seconds())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    options = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    print(f"N={options.n} tasks per side, {options.rounds} round(s), prefork -c {options.concurrency}, "
          f"broker {BROKER_URL}, database {DB_URL.rsplit('@', 1)[-1]}")
    print(f"{'scenario':<10} {'baseline tasks/s':>17} {'recovery tasks/s':>17} {'ratio':>7} {'target':>7}")
    for scenario in options.only or SCENARIOS:
        plain_name, recovery_name = SCENARIOS[scenario]
        plain_runs, recovery_runs = [], []
        for round_number in range(options.rounds):
            sides = [(plain_runs, plain_name, False), (recovery_runs, recovery_name, True)]
            for runs, name, with_recovery in (sides if round_number % 2 == 0 else sides[::-1]):
                runs.append(run_side(name, options.n, options.concurrency, with_recovery))
        plain_best, recovery_best = statistics.median(plain_runs), statistics.median(recovery_runs)
        ratio = recovery_best / plain_best
        if options.verbose:
            print(f"  {scenario} runs: baseline {[round(x) for x in plain_runs]}, "
                  f"recovery {[round(x) for x in recovery_runs]}")
        verdict = "ok" if ratio >= TARGETS[scenario] else "BELOW"
        print(f"{scenario:<10} {plain_best:>17.1f} {recovery_best:>17.1f} {ratio:>7.3f} "
              f"{TARGETS[scenario]:>6.2f} {verdict}", flush=True)


if __name__ == "__main__":
    main()
