"""Time of one uncached ``/metrics`` scrape at 1,000,000 letters.

What: ``GET /metrics`` through ``django.test.Client`` (the token check, every scrape-time
collector: open letters by status/kind/task, the spool, outbox and due backlogs, incidents,
circuits; the event counters), in-process, on the change list's seeded database
(``bench/changelist.py`` seeds it, or reuses it when it holds exactly N rows).
``METRICS_CACHE_SECONDS`` is 0, so every scrape runs its queries: the figure is what one
Prometheus replica's scrape costs when the cache has expired, not the cached answer.
Target: median < 50 ms. The statements of one scrape are timed too, slowest first, so a
miss says which query it is.

Usage: python bench/metrics_scrape.py [--n 1000000] [--repeat 30]
Environment: as bench/changelist.py (BENCH_CHANGELIST_DATABASE_URL or BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import changelist  # noqa: E402  (points Django at the change list's database)

TARGET_MS = 50.0
TOKEN = "bench-metrics-token"


def _prepared(n: int):
    changelist.ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    from recovery.models import DeadLetter

    call_command("migrate", verbosity=0)
    changelist.forget_writer_letters()
    if DeadLetter.objects.count() != n:
        print(f"seeding {n:,} letters", flush=True)
        changelist.seed(n)
    else:
        changelist.vacuum()


def _settings():
    from django.conf import settings
    from django.test import override_settings

    return override_settings(RECOVERY={**settings.RECOVERY, "METRICS_CACHE_SECONDS": 0,
                                       "METRICS_TOKEN": TOKEN})


def scrape_times(repeat: int, warmups: int = 2) -> list[float]:
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    times = []
    for i in range(warmups + repeat):
        started = time.perf_counter()
        response = client.get("/metrics")
        took = (time.perf_counter() - started) * 1000
        if response.status_code != 200 or b"recovery_" not in response.content:
            raise SystemExit(f"GET /metrics answered {response.status_code}: "
                             f"{response.content[:200]!r}")
        if i >= warmups:
            times.append(took)
    return times


def slowest_statements(limit: int = 5) -> list[tuple[float, str]]:
    from django.db import connection
    from django.test import Client

    timed: list[tuple[float, str]] = []

    def wrapper(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            timed.append(((time.perf_counter() - started) * 1000, " ".join(sql.split())))

    with connection.execute_wrapper(wrapper):
        Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").get("/metrics")
    return sorted(timed, reverse=True)[:limit]


def figures(mode: str) -> list:
    from bench.plan import sizes
    from bench.rounds import Figure

    n = sizes("changelist", mode)["n"]
    repeat = {"full": 30, "quick": 15, "smoke": 3}[mode]
    _prepared(n)
    with _settings():
        times = scrape_times(repeat)
        statements = slowest_statements()
    total = sum(ms for ms, _ in statements)
    print(f"/metrics at {n:,} letters: slowest statements of one scrape:", flush=True)
    for ms, sql in statements:
        print(f"  {ms:7.1f} ms  {sql[:160]}", flush=True)
    return [Figure(name="/metrics scrape, uncached", value=statistics.median(times), unit="ms",
                   target_op="<", target=TARGET_MS, spread=(min(times), max(times)),
                   detail=f"N={n:,}, {len(times)} scrapes, p95 "
                          f"{changelist.nearest_rank(times, 0.95):.1f} ms; slowest statement "
                          f"{statements[0][0]:.1f} ms, the five slowest {total:.1f} ms")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("full", "quick", "smoke"), default="full")
    options = parser.parse_args()
    from bench.report import row, table

    found = figures(options.mode)
    print(table([row(f) for f in found], [f"  {f.name}: {f.detail}" for f in found]))


if __name__ == "__main__":
    main()
