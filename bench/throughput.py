"""Throughput of RecoveryTask against plain Celery, measured in one run on the same broker
(Redis, RabbitMQ or SQS: BENCH_BROKER_URL; on RabbitMQ both sides use the quorum queue
recovery.setup declares, so the ratio measures recovery's runtime, not the queue type;
`make bench BROKER=sqs` runs it against a local moto server, whose HTTP round trips, not
a real SQS's, set the pace).

Scenarios (N tasks each, pre-queued, then one worker drains them):
  success  - no-op tasks: plain celery.Task vs RecoveryTask
  retry    - fail once then succeed: Celery autoretry_for vs RecoveryTask's policy
  park     - fail permanently: django-celery-results storing FAILURE vs RecoveryTask parking
             a dead letter with its FAILURE result
Throughput is (N - 1) / (last date_done - first date_done) from the result backend, so
worker start-up is not counted. Worker CPU per task is the CPU time of the worker and its
pool children (wait4 rusage) minus an idle worker's start-up CPU, divided by N. Sides alternate (and swap who goes first) for ROUNDS
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
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

SCENARIOS = {
    "success": ("bench.noop_plain", "bench.noop_recovery"),
    "retry": ("bench.retry_plain", "bench.retry_recovery"),
    "park": ("bench.fail_plain", "bench.fail_recovery"),
}
TARGETS = {"success": 0.97, "retry": 1.0, "park": 1.0}


def empty_broker(url: str, queues: tuple[str, ...]) -> None:
    from bench.common import empty_broker as empty

    empty(url, queues)


def ensure_database() -> None:
    from bench.common import ensure_database as create_if_missing

    create_if_missing(DB_URL)


def _stop_and_cpu(worker: subprocess.Popen) -> float:
    """SIGTERM the worker; return the CPU seconds of it and its pool children."""
    os.killpg(worker.pid, signal.SIGTERM)
    _, _, usage = os.wait4(worker.pid, 0)
    worker.returncode = 0
    return usage.ru_utime + usage.ru_stime


def _start_worker(with_recovery: bool, concurrency: int) -> subprocess.Popen:
    env = {**os.environ, "BENCH_RECOVERY": "1" if with_recovery else "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.bench_app:app", "worker", "-Q", "bench",
         "-P", "prefork", "-c", str(concurrency), "-l", "ERROR", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def idle_cpu(concurrency: int, with_recovery: bool, seconds: float = 6.0) -> float:
    """CPU a worker spends starting and idling, subtracted from each measured run."""
    worker = _start_worker(with_recovery, concurrency)
    time.sleep(seconds)
    return _stop_and_cpu(worker)


def run_side(task_name: str, n: int, concurrency: int, with_recovery: bool) -> tuple[float, float]:
    """Returns (tasks per second, worker CPU seconds including start-up)."""
    from django.db import connection
    from django_celery_results.models import TaskResult

    from bench.bench_app import app
    from recovery.models import DeadLetter

    with connection.cursor() as cursor:  # TRUNCATE: no dead tuples left to slow the next run
        cursor.execute(f"TRUNCATE {TaskResult._meta.db_table}, {DeadLetter._meta.db_table} CASCADE")
    empty_broker(BROKER_URL, ("bench",))
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(task_name, args=(i,), producer=producer)
    connection.close()
    worker = _start_worker(with_recovery, concurrency)
    cpu = None
    try:
        deadline = time.monotonic() + 600
        while True:
            done = TaskResult.objects.filter(task_name=task_name, status__in=("SUCCESS", "FAILURE")).count()
            if done >= n:
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"{task_name}: only {done}/{n} finished")
            time.sleep(0.5)
        cpu = _stop_and_cpu(worker)
    finally:
        if cpu is None:
            os.killpg(worker.pid, signal.SIGKILL)
    stamps = TaskResult.objects.filter(task_name=task_name).order_by("date_done").values_list("date_done", flat=True)
    first, last = stamps.first(), stamps.last()
    if first is None or last is None or first == last:
        raise SystemExit(f"{task_name}: no completion times recorded (first={first}, last={last})")
    if with_recovery and task_name == "bench.fail_recovery":
        parked = DeadLetter.objects.count()
        if parked != n:
            raise SystemExit(f"expected {n} dead letters, found {parked}")
    return (n - 1) / max(1e-9, (last - first).total_seconds()), cpu


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
    idle = {side: idle_cpu(options.concurrency, side) for side in (False, True)}
    print(f"idle worker CPU (start-up, subtracted): baseline {idle[False]:.2f}s, "
          f"recovery {idle[True]:.2f}s")
    print("Wall-clock throughput is noisy on a shared 2-core machine (see --verbose); worker CPU")
    print("per task is the steadier measure of what recovery adds. Ratios: >1 means recovery is faster.")
    print(f"{'scenario':<9} {'base t/s':>9} {'recov t/s':>9} {'ratio':>6} | "
          f"{'base ms CPU':>11} {'recov ms CPU':>12} {'ratio':>6} | {'target':>6}")
    for scenario in options.only or SCENARIOS:
        plain_name, recovery_name = SCENARIOS[scenario]
        runs = {False: [], True: []}
        for round_number in range(options.rounds):
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for with_recovery in order:
                name = recovery_name if with_recovery else plain_name
                rate, cpu = run_side(name, options.n, options.concurrency, with_recovery)
                cpu_ms = max(1e-6, cpu - idle[with_recovery]) / options.n * 1000
                runs[with_recovery].append((rate, cpu_ms))
        rate = {side: statistics.median(r for r, _ in runs[side]) for side in runs}
        cpu_ms = {side: statistics.median(c for _, c in runs[side]) for side in runs}
        rate_ratio = rate[True] / rate[False]
        cpu_ratio = cpu_ms[False] / cpu_ms[True]
        if options.verbose:
            for side, label in ((False, "baseline"), (True, "recovery")):
                print(f"  {scenario} {label}: " + ", ".join(f"{r:.0f} t/s {c:.2f} ms" for r, c in runs[side]))
        verdict = "ok" if min(rate_ratio, cpu_ratio) >= TARGETS[scenario] else (
            "ok (CPU)" if cpu_ratio >= TARGETS[scenario] else "BELOW")
        print(f"{scenario:<9} {rate[False]:>9.1f} {rate[True]:>9.1f} {rate_ratio:>6.3f} | "
              f"{cpu_ms[False]:>11.3f} {cpu_ms[True]:>12.3f} {cpu_ratio:>6.3f} | "
              f"{TARGETS[scenario]:>5.2f} {verdict}", flush=True)


if __name__ == "__main__":
    main()
