"""Calls/s on one hot circuit from 8 processes: the Redis ``WATCH``/``MULTI`` loop the
circuit used to count calls with, against the Lua script it counts with now.

Every call of every worker writes the closed circuit's window, so at scale one key takes
all the writes. With WATCH, a writer whose key changed between its read and its write
retries; with the script (``recovery.workflows.circuit._COUNT_CLOSED``) Redis runs the
count where the record lives, once. Both sides run the same state machine on the same
Redis, P processes x N calls each, sides interleaved round by round (A,B then B,A); the
WATCH side also counts its conflicts (retries).

Usage: python bench/circuit_contention.py [--processes 8] [--calls 2000] [--rounds 3]
Environment: BENCH_STATE_URL (default redis://127.0.0.1:6379/14; its keys are deleted)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off

STATE_URL = os.environ.get("BENCH_STATE_URL", "redis://127.0.0.1:6379/14")


def _watch_loop(store, key: str, change) -> int:
    """The old RedisStore.update, counting its retries."""
    import redis

    from recovery.workflows.shared_state import KEY_PREFIX

    name, conflicts = KEY_PREFIX + key, 0
    with store.client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(name)
                raw = pipe.get(name)
                record = json.loads(raw) if raw else {}
                change(record)
                pipe.multi()
                pipe.set(name, json.dumps(record))
                pipe.execute()
                return conflicts
            except redis.WatchError:
                conflicts += 1


def _worker(side: str, name: str, calls: int, start_at: float, out) -> None:
    import django

    django.setup()
    from recovery.workflows.circuit import Circuit, CircuitPolicy, _record
    from recovery.workflows.shared_state import RedisStore

    policy = CircuitPolicy(failure_rate_threshold=0.99, minimum_calls=10**9, window_seconds=600)
    store = RedisStore(STATE_URL)
    breaker = Circuit(name, policy, store=store)
    conflicts = 0
    while time.time() < start_at:
        time.sleep(0.001)
    started = time.perf_counter()
    for n in range(calls):
        ok = n % 4 != 0
        if side == "script":
            breaker.record(ok)
        else:
            now = time.time()
            conflicts += _watch_loop(store, breaker.key,
                                     lambda record: _record(record, now, ok, policy))
    out.put((time.perf_counter() - started, conflicts))


def run_side(side: str, processes: int, calls: int) -> tuple[float, int, int]:
    """(calls/s over all processes, conflicts, calls counted in the record)."""
    import redis

    from recovery.workflows.shared_state import KEY_PREFIX

    name = f"bench-{side}-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    start_at = time.time() + 1.0
    workers = [context.Process(target=_worker, args=(side, name, calls, start_at, out))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    client = redis.Redis.from_url(STATE_URL)
    record = json.loads(client.get(f"{KEY_PREFIX}circuit:{name}"))
    client.delete(f"{KEY_PREFIX}circuit:{name}")
    counted = sum(v[0] for v in record["buckets"].values())
    wall = max(seconds for seconds, _ in results)
    return processes * calls / wall, sum(c for _, c in results), counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000, help="calls per process")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    ratios, rates = [], {"watch": [], "script": []}
    for number in range(options.rounds):
        order = ("watch", "script") if number % 2 == 0 else ("script", "watch")
        got = {}
        for side in order:
            rate, conflicts, counted = run_side(side, options.processes, options.calls)
            expected = options.processes * options.calls
            if counted != expected:
                raise SystemExit(f"{side}: {counted} calls counted, {expected} made")
            got[side] = rate
            rates[side].append(rate)
            print(f"  round {number + 1} {side:<6}: {rate:8,.0f} calls/s, "
                  f"{conflicts:,} WATCH conflicts retried, {counted:,} calls counted", flush=True)
        ratios.append(got["script"] / got["watch"])
    print(f"{options.processes} processes x {options.calls:,} calls on one circuit, "
          f"{options.rounds} rounds: script {statistics.median(rates['script']):,.0f} calls/s, "
          f"WATCH {statistics.median(rates['watch']):,.0f} calls/s; ratio script/WATCH "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
