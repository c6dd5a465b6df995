"""Where a worker's time goes per task: cProfile around N tasks of one scenario.

N tasks of one scenario (success / retry / park, bench/bench_app.py's tasks) are
pre-queued, then a solo-pool worker runs in this process and drains them. The profiler is
enabled at the first task's ``task_prerun`` and disabled at the last one's
``task_postrun``, so start-up is not counted. It prints the top functions by cumulative
time, the microseconds per task of recovery's own frames (the task's ``__call__``, the
request class, the backend wrapper, parking) and the SQL statements per task (counted
with ``connection.execute_wrapper``).

Usage: python bench/profile_worker.py success|retry|park [--n 2000] [--side recovery|plain]
       [--out FILE.prof] [--top 30]
Environment: BENCH_DATABASE_URL, BENCH_BROKER_URL (as bench/throughput.py; the broker's
db is flushed and the result and letter tables truncated).
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The same database, broker and environment as throughput.py (set when it is imported).
from bench.throughput import BROKER_URL, DB_URL  # noqa: E402

TASKS = {
    "success": {"plain": "bench.noop_plain", "recovery": "bench.noop_recovery"},
    "retry": {"plain": "bench.retry_plain", "recovery": "bench.retry_recovery"},
    "park": {"plain": "bench.fail_plain", "recovery": "bench.fail_recovery"},
}

#: Recovery's frames reported per task: (file suffix, function name).
FRAMES = (
    ("recovery/task.py", "__call__"),
    ("recovery/task.py", "on_success"),
    ("recovery/task.py", "backend"),
    ("recovery/task.py", "mark_as_done"),
    ("recovery/task.py", "mark_as_failure"),
    ("recovery/task.py", "_bookkeeping_write"),
    ("recovery/task.py", "_recover"),
    ("recovery/task.py", "classify"),
    ("recovery/task.py", "effective_policy"),
    ("recovery/task.py", "_schedule_retry"),
    ("recovery/task.py", "_send_again"),
    ("recovery/task.py", "_park"),
    ("recovery/task.py", "_replay_options"),
    ("recovery/store/parking.py", "park"),
    ("recovery/store/parking.py", "__post_init__"),
    ("recovery/store/parking.py", "_write"),
    ("recovery/store/pg_fastpath.py", "insert_new_letter"),
    ("recovery/store/result_rows.py", "hidden_in_request"),
    ("recovery/store/result_rows.py", "scrubbed_failure"),
    ("recovery/events.py", "send"),
    ("recovery/delivery/worker.py", "__init__"),
    ("recovery/delivery/worker.py", "_mask_reprs"),
    ("recovery/delivery/worker.py", "on_failure"),
    ("recovery/wiring.py", "_reuse_connection"),
    ("celery/app/task.py", "retry"),
    ("celery/app/trace.py", "trace_task"),
    ("celery/worker/request.py", "execute_using_pool"),
    ("django_celery_results/backends/database.py", "_store_result"),
    ("django_celery_results/backends/database.py", "_get_extended_properties"),
)


def prepare(task_name: str, n: int) -> None:
    from django.core.management import call_command
    from django_celery_results.models import TaskResult

    from bench.bench_app import app
    from bench.common import ensure_database, fresh_queue
    from recovery.models import DeadLetter

    ensure_database(DB_URL)
    call_command("migrate", verbosity=0)
    fresh_queue(app, BROKER_URL, task_name, n, (TaskResult._meta.db_table, DeadLetter._meta.db_table))


def profile(task_name: str, n: int) -> tuple[cProfile.Profile, dict]:
    """Run a solo worker until ``n`` tasks of ``task_name`` finished; profile the tasks."""
    from celery import signals, states
    from celery.worker import state as worker_state
    from django.db import connection

    from bench.bench_app import app

    profiler = cProfile.Profile()
    counts = {"done": 0, "runs": 0, "statements": collections.Counter(), "cpu": 0.0, "wall": 0.0}
    clock = {}

    def count_statement(execute, sql, params, many, context):
        counts["statements"][sql.split(None, 1)[0].upper() if sql else "?"] += 1
        return execute(sql, params, many, context)

    def prerun(sender=None, **kwargs):
        if sender is None or sender.name != task_name:
            return
        counts["runs"] += 1
        if not clock:
            connection.execute_wrappers.append(count_statement)
            clock.update(cpu=time.process_time(), wall=time.perf_counter())
            profiler.enable()

    def postrun(sender=None, state=None, **kwargs):
        if sender is None or sender.name != task_name or state not in (states.SUCCESS, states.FAILURE):
            return
        counts["done"] += 1
        if counts["done"] >= n:
            profiler.disable()
            counts["cpu"] = time.process_time() - clock["cpu"]
            counts["wall"] = time.perf_counter() - clock["wall"]
            if count_statement in connection.execute_wrappers:
                connection.execute_wrappers.remove(count_statement)
            worker_state.should_stop = 0  # the event loop stops the worker

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    worker = app.Worker(pool_cls="solo", concurrency=1, queues=["bench"], loglevel="ERROR",
                        without_gossip=True, without_mingle=True, without_heartbeat=True,
                        quiet=True, redirect_stdouts=False)
    worker.start()
    if counts["done"] < n:
        raise SystemExit(f"{task_name}: only {counts['done']}/{n} finished")
    return profiler, counts


def frame_table(stats: pstats.Stats, n: int) -> list[tuple[str, int, float, float]]:
    """(frame, calls, cumulative µs per task, own µs per task) of the FRAMES found."""
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        for suffix, name in FRAMES:
            if func == name and filename.endswith(suffix):
                label = f"{suffix.rsplit('/', 1)[-1]}:{line}({func})"
                rows.append((label, calls, cumtime / n * 1e6, tottime / n * 1e6))
    return sorted(rows, key=lambda row: -row[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(TASKS))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--side", choices=("recovery", "plain"), default="recovery")
    parser.add_argument("--out", help="where to dump the .prof (default /tmp/profile_<scenario>_<side>.prof)")
    parser.add_argument("--top", type=int, default=30)
    options = parser.parse_args()

    os.environ["BENCH_RECOVERY"] = "1" if options.side == "recovery" else "0"
    import django

    django.setup()
    task_name = TASKS[options.scenario][options.side]
    prepare(task_name, options.n)
    profiler, counts = profile(task_name, options.n)
    out = options.out or f"/tmp/profile_{options.scenario}_{options.side}.prof"
    profiler.dump_stats(out)

    n = options.n
    stats = pstats.Stats(profiler)
    statements = counts["statements"]
    print(f"{task_name}: {n} tasks ({counts['runs']} runs), solo pool, profiled "
          f"(profiler overhead included): {counts['cpu'] / n * 1e6:.0f} µs CPU/task, "
          f"{counts['wall'] / n * 1e6:.0f} µs wall/task; profile in {out}")
    print(f"SQL statements per task: {sum(statements.values()) / n:.2f} "
          f"({', '.join(f'{verb} {count / n:.2f}' for verb, count in statements.most_common())})")
    print(f"\nrecovery's frames, per task ({n}):")
    print(f"{'frame':<52} {'calls':>7} {'cum µs':>8} {'own µs':>8}")
    for label, calls, cum, own in frame_table(stats, n):
        print(f"{label:<52} {calls:>7} {cum:>8.1f} {own:>8.1f}")
    print(f"\ntop {options.top} by cumulative time:")
    stats.sort_stats("cumulative").print_stats(options.top)


if __name__ == "__main__":
    main()
