"""How parking and replay scale with worker processes, and what a letter costs on disk;
the figures of docs/scaling.md.

- parking: N tasks of ``bench.fail_recovery`` pre-queued, one prefork worker with
  ``-c 1``, ``2`` and ``4`` parks them (letters/s from the FAILURE results' completion
  times, as bench/throughput.py measures).
- replay: N parked letters, replayed by 1, 2 and 4 concurrent ``bulk("replay")`` processes
  over the same queryset (each batch locked ``FOR UPDATE SKIP LOCKED``, so they share the
  work); letters/s from the first start to the last finish; checked: N messages queued.
- table growth (``--table-growth``): bytes per letter of the dead-letter table, its TOAST
  and each index, on the change list's seeded database (``bench/changelist.py``).

The machine has 2 cores: above 2 processes the curve shows contention, not capacity.

Usage: python bench/scaling.py [--n 2000] [--processes 1 2 4] [--table-growth]
Environment: BENCH_DATABASE_URL, BENCH_BROKER_URL (default redis://127.0.0.1:6379/12).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")

from bench import bulk_replay, throughput  # noqa: E402  (the same database and broker)


def parking(n: int, processes: list[int]) -> None:
    throughput.prepare()
    for concurrency in processes:
        rate, _ = throughput.run_side("bench.fail_recovery", n, concurrency, True)
        print(f"  parking, worker -c {concurrency}: {rate:8,.0f} letters/s (N={n:,})", flush=True)


def _replayer(start_at: float, out) -> None:
    import django

    django.db.connections.close_all()
    from recovery.models import DeadLetter
    from recovery.operations.replay import bulk

    from bench.bench_app import app

    while time.time() < start_at:
        time.sleep(0.001)
    result = bulk("replay", DeadLetter.objects.all(), actor="bench", batch_size=500, app=app)
    out.put((time.time(), result.done, result.failed))


def replay(n: int, processes: list[int]) -> None:
    from bench.common import empty_broker

    bulk_replay.ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    import redis

    for count in processes:
        bulk_replay.seed(n)
        empty_broker(bulk_replay.BROKER_URL, (bulk_replay.QUEUE,))
        django.db.connections.close_all()
        context = multiprocessing.get_context("fork")
        out = context.Queue()
        start_at = time.time() + 1.0
        workers = [context.Process(target=_replayer, args=(start_at, out)) for _ in range(count)]
        for worker in workers:
            worker.start()
        results = [out.get(timeout=900) for _ in workers]
        for worker in workers:
            worker.join()
        done = sum(r[1] for r in results)
        queued = redis.Redis.from_url(bulk_replay.BROKER_URL).llen(bulk_replay.QUEUE)
        if done != n or queued != n or any(r[2] for r in results):
            raise SystemExit(f"{count} replayers: {done} done, {queued} queued, of {n}")
        wall = max(r[0] for r in results) - start_at
        print(f"  replay, {count} process{'es' if count > 1 else ''}: {n / wall:8,.0f} letters/s "
              f"(N={n:,}; per process {', '.join(str(r[1]) for r in results)})", flush=True)


def table_growth() -> None:
    from bench import changelist

    import django

    django.setup()
    from django.db import connection

    from recovery.models import DeadLetter

    table = DeadLetter._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        rows = cursor.fetchone()[0]
        cursor.execute("SELECT pg_relation_size(%s), pg_total_relation_size(%s), "
                       "pg_indexes_size(%s), COALESCE(pg_total_relation_size(reltoastrelid), 0) "
                       "FROM pg_class WHERE relname = %s", [table, table, table, table])
        heap, total, indexes, toast = cursor.fetchone()
        cursor.execute("SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
                       "WHERE relname = %s ORDER BY 2 DESC", [table])
        by_index = cursor.fetchall()
    print(f"  {table} at {rows:,} letters ({changelist.DB_URL.rsplit('/', 1)[-1]}): total "
          f"{total / 2**20:,.0f} MiB = {total / rows:,.0f} bytes/letter; heap "
          f"{heap / rows:,.0f}, TOAST {toast / rows:,.0f}, indexes {indexes / rows:,.0f} bytes/letter")
    for name, size in by_index:
        print(f"    {name:<45} {size / 2**20:8.1f} MiB  {size / rows:6.0f} bytes/letter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--table-growth", action="store_true",
                        help="only the table's bytes per letter (change list database)")
    options = parser.parse_args()
    if options.table_growth:
        table_growth()
        return
    parking(options.n, options.processes)
    replay(options.n * 10, options.processes)


if __name__ == "__main__":
    main()
