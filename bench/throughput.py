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
  park_like - the same, against stock Celery plus a hand-written on_failure that saves the
             dead letter too (like for like: both sides write both rows)
Throughput is (N - W) / (last date_done - the moment task W started), W = ten tasks per
pool child (warm_up_tasks): the first run of task W writes that moment to a file
(bench_app.mark_start), so worker start-up and each child's first tasks (database
connection, caches) are not counted, and every later run of every task is (the window
used to open at the first completion, which in the retry scenario left out all N failing
first runs and their retry publishes: they all come before any task completes). Worker
CPU per task is the CPU (from /proc) of the worker and its pool children over the same
window, divided by N - W: start-up, idling and shutdown count on neither side and nothing
is subtracted. Each round runs both sides back to back, the next
round swaps who goes first (bench/rounds.py); a figure is the median of the per-round ratios,
with their min–max as its spread. Wall clock and CPU are both reported for every scenario.
Targets (recovery / baseline): success >= 0.97 (wall and CPU), retry >= 1.5, park >= 1.5.

Usage: python bench/throughput.py [--n 2000] [--rounds 5] [--concurrency 2] [--only SCENARIO]
bench/run.py calls figures(mode) with the sizes of bench/plan.py.
Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/celery_recovery_bench),
BENCH_BROKER_URL (default redis://127.0.0.1:6379/12).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/celery_recovery_bench")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
os.environ["DATABASE_URL"] = DB_URL
os.environ["CELERY_BROKER_URL"] = BROKER_URL
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

# The harness's pure modules: no Django, so they may come before django.setup().
from bench.plan import sizes  # noqa: E402
from bench.proc_cpu import tree_cpu_seconds  # noqa: E402
from bench.report import figures_table  # noqa: E402
from bench.rounds import Figure, interleave, ratio_figure, ratio_spread  # noqa: E402

SCENARIOS = {
    "success": ("bench.noop_plain", "bench.noop_recovery"),
    "retry": ("bench.retry_plain", "bench.retry_recovery"),
    "park": ("bench.fail_plain", "bench.fail_recovery"),
    "park_like": ("bench.fail_plain_dead_letter", "bench.fail_recovery"),
}
#: park_like is the like-for-like figure of parking (the issue asks for one where a path
#: does more than its baseline): the baseline also keeps a dead letter, by hand.
TARGETS = {"success": 0.97, "retry": 1.5, "park": 1.5, "park_like": 1.0}
BASELINES = {"success": "plain", "retry": "autoretry_for", "park": "django-celery-results",
             "park_like": "hand-written on_failure dead letter"}


def empty_broker(url: str, queues: tuple[str, ...]) -> None:
    from bench.common import empty_broker as empty

    empty(url, queues)


def ensure_database() -> None:
    from bench.common import ensure_database as create_if_missing

    create_if_missing(DB_URL)


def _stop(worker: subprocess.Popen) -> None:
    """SIGTERM the worker's process group and reap it."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def _start_worker(with_recovery: bool, concurrency: int, start_mark: str,
                  start_index: int) -> subprocess.Popen:
    env = {**os.environ, "BENCH_RECOVERY": "1" if with_recovery else "0",
           "BENCH_START_MARK": start_mark, "BENCH_START_INDEX": str(start_index)}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.bench_app:app", "worker", "-Q", "bench",
         "-P", "prefork", "-c", str(concurrency), "-l", "ERROR", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def run_side(task_name: str, n: int, concurrency: int, with_recovery: bool) -> tuple[float, float]:
    """Returns (tasks per second, worker CPU milliseconds per task), both over the window
    from the moment task ``warm_up_tasks`` starts to the last task's completion."""
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
    start_mark = Path(tempfile.gettempdir()) / f"bench-start-{os.getpid()}"
    start_mark.unlink(missing_ok=True)
    warm = warm_up_tasks(n, concurrency)
    worker = _start_worker(with_recovery, concurrency, str(start_mark), warm)
    finished = TaskResult.objects.filter(task_name=task_name, status__in=("SUCCESS", "FAILURE"))
    try:
        deadline = time.monotonic() + 600
        while not start_mark.exists():  # start-up: the window opens as task ``warm`` starts
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{task_name}: no task started")
            time.sleep(0.002)
        cpu_first = tree_cpu_seconds(worker.pid)
        while True:
            done = finished.count()
            if done >= n:
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{task_name}: only {done}/{n} finished")
            time.sleep(0.05)
        cpu = tree_cpu_seconds(worker.pid) - cpu_first  # before SIGTERM: not shutdown's
    finally:
        _stop(worker)
    started = _read_mark(start_mark)
    last = TaskResult.objects.filter(task_name=task_name).order_by("-date_done").values_list(
        "date_done", flat=True).first()
    if last is None or last.timestamp() <= started:
        raise RuntimeError(f"{task_name}: no completion after the start (start={started}, last={last})")
    if task_name in ("bench.fail_recovery", "bench.fail_plain_dead_letter"):
        parked = DeadLetter.objects.count()
        if parked != n:
            raise RuntimeError(f"expected {n} dead letters, found {parked}")
    measured = n - warm
    return measured / (last.timestamp() - started), cpu / measured * 1000


def warm_up_tasks(n: int, concurrency: int) -> int:
    """How many tasks run before the window opens: ten per pool child (a child's first
    task connects to the database and fills caches), at most a tenth of N."""
    return min(10 * concurrency, n // 10)


def _read_mark(path: Path) -> float:
    """The first task's start time, written by bench_app.mark_start (a poll may see the
    file before its time is written)."""
    for _ in range(100):
        text = path.read_text()
        if text:
            path.unlink()
            return float(text)
        time.sleep(0.01)
    raise RuntimeError(f"{path}: the start mark holds no time")


def prepare() -> None:
    """The benchmark's database exists and is migrated; Django is set up."""
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def scenario_figures(scenario: str, rounds: list[tuple[tuple[float, float], ...]], n: int) -> list[Figure]:
    """Wall-clock and CPU figures of one scenario from its rounds of (plain, recovery) sides,
    each side a (tasks/s, CPU ms per task) pair."""
    def per_side(side: int, index: int, fmt: str) -> str:
        return ", ".join(format(values[side][index], fmt) for values in rounds)

    baseline, target = BASELINES[scenario], TARGETS[scenario]
    wall = ratio_spread(rounds, lambda plain, recov: recov[0] / plain[0])
    cpu = ratio_spread(rounds, lambda plain, recov: plain[1] / recov[1])
    return [
        ratio_figure(f"{scenario} wall clock (recovery/{baseline})", wall, ">=", target,
                     f"N={n}, {len(rounds)} rounds; tasks/s plain {per_side(0, 0, '.0f')}; "
                     f"recovery {per_side(1, 0, '.0f')}"),
        ratio_figure(f"{scenario} worker CPU ({baseline}/recovery per task)", cpu, ">=", target,
                     f"CPU ms/task plain {per_side(0, 1, '.3f')}; recovery {per_side(1, 1, '.3f')}"),
    ]


def run(n: int, rounds: int, concurrency: int, scenarios: tuple[str, ...],
        verbose: bool = False) -> list[Figure]:
    """Measure ``scenarios`` in interleaved rounds; two figures (wall, CPU) per scenario."""
    prepare()

    def side(scenario: str, with_recovery: bool) -> Callable[[], tuple[float, float]]:
        name = SCENARIOS[scenario][int(with_recovery)]

        def measure() -> tuple[float, float]:
            rate, cpu_ms = run_side(name, n, concurrency, with_recovery)
            if verbose:
                print(f"  {name}: {rate:.0f} t/s, {cpu_ms:.3f} ms CPU/task", flush=True)
            return rate, cpu_ms

        return measure

    figures = []
    for scenario in scenarios:
        results = interleave([side(scenario, False), side(scenario, True)], rounds)
        figures += scenario_figures(scenario, results, n)
    return figures


def figures(mode: str) -> list[Figure]:
    """The harness's entry point (bench/run.py): the figures at the sizes of ``mode``."""
    return run(**sizes("throughput", mode))


def main() -> None:
    full = sizes("throughput", "full")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=full["n"])
    parser.add_argument("--rounds", type=int, default=full["rounds"])
    parser.add_argument("--concurrency", type=int, default=full["concurrency"])
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    options = parser.parse_args()
    print(f"N={options.n} tasks per side, {options.rounds} round(s), prefork -c {options.concurrency}, "
          f"broker {BROKER_URL}, database {DB_URL.rsplit('@', 1)[-1]}", flush=True)
    results = run(options.n, options.rounds, options.concurrency,
                  tuple(options.only or SCENARIOS), verbose=options.verbose)
    print(figures_table(results))


if __name__ == "__main__":
    main()
