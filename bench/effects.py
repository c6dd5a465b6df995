"""What ``self.effect`` costs per effect: the proof row written in the effect's own
transaction, against the same write in a plain ``transaction.atomic()``.

Both sides write one row of a scratch table per effect, in its own transaction, on one
reused PostgreSQL connection (as a worker's task does); the effect side also inserts the
``recovery_effect`` proof in a savepoint. Sides alternate round by round (A,B then B,A)
and the per-round ratios are reported as a median with their spread. A third figure
is the check a run that comes again pays: the effect found already recorded.

Usage: python bench/effects.py [--n 2000] [--rounds 5]
Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/celery_recovery_bench)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/celery_recovery_bench")
os.environ["DATABASE_URL"] = DB_URL
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off

from bench.common import ensure_database  # noqa: E402

ensure_database(DB_URL)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from recovery.models import Effect  # noqa: E402
from recovery.store.effects import effect_once  # noqa: E402

TABLE = "bench_effect_probe"


def _write(i: int, task_id: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (i, task_id) VALUES (%s, %s)", [i, task_id])


def plain(n: int, run: str) -> float:
    started = time.perf_counter()
    for i in range(n):
        with transaction.atomic():
            _write(i, f"{run}-{i}")
    return time.perf_counter() - started


def once(n: int, run: str) -> float:
    started = time.perf_counter()
    for i in range(n):
        with effect_once(f"{run}-{i}", "write") as first:
            if first:
                _write(i, f"{run}-{i}")
    return time.perf_counter() - started


def again(n: int, run: str) -> float:
    """The same effects a second time: each is found recorded and skipped."""
    started = time.perf_counter()
    for i in range(n):
        with effect_once(f"{run}-{i}", "write") as first:
            if first:
                raise SystemExit(f"effect {run}-{i} ran twice")
    return time.perf_counter() - started


def prepare() -> None:
    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (i int, task_id text)")
        cursor.execute(f"TRUNCATE {Effect._meta.db_table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="effects per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    prepare()
    plain_us, once_us, again_us, ratios = [], [], [], []
    for round_no in range(options.rounds):
        run = uuid.uuid4().hex[:8]
        sides = [("plain", plain), ("once", once)]
        if round_no % 2:
            sides.reverse()
        took = {name: side(options.n, run) for name, side in sides}
        repeat = again(options.n, run)
        plain_us.append(took["plain"] / options.n * 1e6)
        once_us.append(took["once"] / options.n * 1e6)
        again_us.append(repeat / options.n * 1e6)
        ratios.append(took["plain"] / took["once"])
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {TABLE}, {Effect._meta.db_table}")
    per_effect = [o - p for o, p in zip(once_us, plain_us)]
    print(f"{options.n} effects x {options.rounds} rounds, interleaved, one connection")
    print(f"  plain transaction        {statistics.median(plain_us):8.1f} us/effect")
    print(f"  with self.effect         {statistics.median(once_us):8.1f} us/effect "
          f"(+{statistics.median(per_effect):.1f} us: the proof row)")
    print(f"  again, found and skipped {statistics.median(again_us):8.1f} us/effect")
    print(f"  throughput ratio effect/plain: {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
