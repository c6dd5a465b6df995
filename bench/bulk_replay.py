"""Bulk replay of parked dead letters against raw kombu publishing, measured in one run on
the same Redis and PostgreSQL.

What: ``recovery.operations.replay.bulk("replay", queryset, actor="bench", batch_size=B)`` over N parked
``DeadLetter`` rows (task ``bench.fail_recovery``, args ``[i]``), against the floor of the same
broker work: kombu ``Producer.publish`` of the same N Celery protocol-2 messages (same task
name, args, kwargs, task ids, root id, origin, reply_to and ``recovery_replay`` header), built
beforehand with ``app.amqp.as_task_v2`` and published in a loop on one producer. With
``--celery``, a third side shows what Celery's own publish path costs: the same messages sent
with ``app.send_task`` in a loop on one producer (a hand-written "republish these" script).

How:
  - Each side of each round starts from the same state: the letter and event tables are
    truncated and N parked rows are seeded with one ``INSERT ... SELECT generate_series``
    (then VACUUM ANALYZE), and the Redis database is flushed.
  - Each side runs in a fresh child process (like a new ``manage.py dlq replay``), so its
    memory figures are its own.
  - replay: wall-clock time of the ``bulk()`` call (reading, locking, marking ``replaying``,
    publishing and writing one ``DeadLetterEvent`` per letter); afterwards the parent checks
    N messages on the queue, N ``replaying`` letters and N ``replayed`` events.
  - baseline: the letters are read and their messages built untimed; the timed part is the
    publish loop only; afterwards the parent checks N messages on the queue.
  - celery send_task: the letters are read untimed; the timed part is the send_task loop.
  - Before timing, letter 1 is published by the replay and by the baseline and the two
    messages are compared (headers, properties, body): both sides send the same thing.
  - Sides alternate (and swap who goes first) for ROUNDS rounds; the median of each side counts.
    Ratio = replay letters/s / baseline letters/s; target >= 0.5.
  - Memory of the replay, from its timed runs: the process's peak RSS (ru_maxrss) once N/10
    letters are done against once all N are (constant memory: the two agree), and its
    increase over the RSS before ``bulk()`` started. Then one more, untimed replay of
    ``--memory-n`` letters under tracemalloc, with the traced peak reset after every batch:
    the Python heap peak per batch over the first tenth against the last tenth.

Usage: python bench/bulk_replay.py [--n 100000] [--rounds 2] [--batch-size 500]
           [--memory-n 10000] [--celery] [--profile FILE] [--verbose]
The default run takes 8 to 10 minutes on a 2-core VM (--celery adds about 2 per round).
Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/celery_recovery_bench),
BENCH_BROKER_URL (default redis://127.0.0.1:6379/13; the database is flushed every round).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/celery_recovery_bench")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
os.environ["DATABASE_URL"] = DB_URL
os.environ["CELERY_BROKER_URL"] = BROKER_URL
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
os.environ["DJANGO_DEBUG"] = "0"  # DEBUG would keep every SQL statement in memory
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

TASK = "bench.fail_recovery"
QUEUE = "bench"
ORIGIN = "gen4242@bench-producer"
TARGET = 0.5
SIDES = {
    "baseline": "kombu publish, pre-built",
    "celery": "celery send_task loop",
    "replay": "recovery.operations.replay.bulk",
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def ensure_database() -> None:
    from bench.common import ensure_database as create_if_missing

    create_if_missing(DB_URL)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed(n: int) -> None:
    """N parked letters of TASK, as RecoveryTask would have parked them, in one statement."""
    from django.db import connection

    from recovery.models import DeadLetter, DeadLetterEvent

    letters, events = DeadLetter._meta.db_table, DeadLetterEvent._meta.db_table
    traceback = ("Traceback (most recent call last):\n"
                 '  File "celery/app/trace.py", line 453, in trace_task\n'
                 "    R = retval = fun(*args, **kwargs)\n"
                 '  File "recovery/task.py", line 180, in __call__\n'
                 "    return self.run(*args, **kwargs)\n"
                 '  File "bench/bench_app.py", line 67, in fail_recovery\n'
                 '    raise PermanentError(f"order {i} cannot be processed")\n'
                 "recovery.errors.PermanentError: order @ cannot be processed\n")
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {letters}, {events} RESTART IDENTITY CASCADE")
        cursor.execute(
            f"""
            INSERT INTO {letters} (
                task_id, task_name, args, kwargs, headers, raw_body, content_type, status, kind,
                permanent, reason, exception_type, exception_message, traceback, attempts,
                replay_count, history, queue, worker, fingerprint, first_failed_at,
                last_failed_at, created_at, updated_at)
            SELECT
                t.id, %(task)s, jsonb_build_array(g), '{{}}'::jsonb,
                jsonb_build_object('root_id', t.id, 'reply_to', md5('reply' || g)::uuid::text,
                                   'replaced_task_nesting', 0, 'origin', %(origin)s,
                                   'exchange', '', 'routing_key', %(queue)s, 'priority', 0),
                '', '', 'parked', 'data_integrity', true,
                'permanent failure: parked (PermanentError)', 'recovery.errors.PermanentError',
                'order ' || g || ' cannot be processed', replace(%(tb)s, '@', g::text), 1, 0,
                jsonb_build_array(jsonb_build_object(
                    'at', to_char(now() - interval '1 hour', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
                    'attempt', 1, 'replay', 0, 'kind', 'data_integrity',
                    'exception_type', 'recovery.errors.PermanentError',
                    'exception_message', 'order ' || g || ' cannot be processed',
                    'delay_seconds', null)),
                %(queue)s, 'celery@bench', 'a4f1c3d2e5b6a7980c1d2e3f4a5b6c7d8e9f0a1b',
                now() - interval '1 hour', now() - interval '1 hour', now(), now()
            FROM generate_series(1, %(n)s) AS g,
                 LATERAL (SELECT md5('bench' || g)::uuid::text AS id) AS t
            """,
            {"task": TASK, "origin": ORIGIN, "queue": QUEUE, "tb": traceback, "n": n},
        )
        cursor.execute(f"VACUUM ANALYZE {letters}")
        cursor.execute(f"ANALYZE {events}")
    connection.close()


def redis_client():
    import redis

    return redis.Redis.from_url(BROKER_URL)


def oldest_message() -> dict:
    return json.loads(redis_client().lindex(QUEUE, -1))  # kombu LPUSHes: the oldest is last


def parked_rows():
    from recovery.models import DeadLetter

    return (DeadLetter.objects.filter(status=DeadLetter.Status.PARKED).order_by("pk")
            .values_list("task_id", "task_name", "args", "kwargs", "headers", "replay_count")
            .iterator(chunk_size=2000))


# -- the sides, each run in its own child process -----------------------------------------

def side_baseline(app, options) -> dict:
    """Raw kombu publish of pre-built messages on one producer: the floor."""
    from recovery.core import headers as hdr

    messages = []
    for task_id, name, args, kwargs, extra, replay_count in parked_rows():
        headers, properties, body, _ = app.amqp.as_task_v2(
            task_id, name, tuple(args), kwargs, root_id=extra.get("root_id"),
            parent_id=extra.get("parent_id"), origin=extra.get("origin"),
            reply_to=extra.get("reply_to"),
            replaced_task_nesting=extra.get("replaced_task_nesting", 0),
        )
        headers[hdr.REPLAY] = replay_count + 1
        messages.append((body, dict(
            exchange="", routing_key=QUEUE, serializer="json", delivery_mode=2,
            headers=headers, priority=extra.get("priority"), **properties,
            # Celery copies execution options it does not know (here: origin) into the
            # message properties too; so does this, so both sides send identical messages.
            **({"origin": extra["origin"]} if "origin" in extra else {}),
        )))
    queue = app.amqp.queues[QUEUE]
    with app.connection_for_write() as connection:
        producer = connection.Producer()
        producer.publish({}, exchange="", routing_key="bench-warmup", declare=[queue])
        started = time.perf_counter()
        for body, publish_options in messages:
            producer.publish(body, **publish_options)
        elapsed = time.perf_counter() - started
    return {"letters": len(messages), "seconds": elapsed}


def side_celery(app, options) -> dict:
    """Celery's own publish path: app.send_task per letter on one producer."""
    from recovery.core import headers as hdr

    rows = list(parked_rows())
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for task_id, name, args, kwargs, extra, replay_count in rows:
            app.send_task(name, args, kwargs, task_id=task_id, producer=producer,
                          headers={hdr.REPLAY: replay_count + 1}, **extra)
    elapsed = time.perf_counter() - started
    return {"letters": len(rows), "seconds": elapsed}


def side_replay(app, options) -> dict:
    """recovery.operations.replay.bulk("replay") over every parked letter, with memory samples."""
    from recovery.operations import replay as service
    from recovery.models import DeadLetter

    n, tenth = options.n, max(1, options.n // 10)
    marks: dict[str, float] = {}

    def progress(result):
        done = result.done + result.failed
        if "first_batch" not in marks:
            marks["first_batch"] = maxrss_mib()
        if done >= tenth and "tenth" not in marks:
            marks["tenth"] = maxrss_mib()

    profiler = None
    if options.profile:
        import cProfile

        profiler = cProfile.Profile()
    marks["before"] = rss_mib()
    marks["maxrss_before"] = maxrss_mib()
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    result = service.bulk("replay", DeadLetter.objects.all(), actor="bench",
                          batch_size=options.batch_size, progress=progress, app=app)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(options.profile)
    marks["end"] = maxrss_mib()
    if result.failed or result.done != n:
        raise SystemExit(f"replay: {result.done} done, {result.failed} failed: {result.errors[:3]}")
    return {"letters": result.done, "seconds": elapsed, "memory": marks}


def side_memory(app, options) -> dict:
    """An untimed replay under tracemalloc: the traced peak of each batch."""
    import tracemalloc

    from recovery.operations import replay as service
    from recovery.models import DeadLetter

    peaks: list[tuple[int, int]] = []  # (letters done after the batch, peak bytes in it)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()

    def progress(result):
        peaks.append((result.done + result.failed, tracemalloc.get_traced_memory()[1] - base))
        tracemalloc.reset_peak()

    result = service.bulk("replay", DeadLetter.objects.all(), actor="bench",
                          batch_size=options.batch_size, progress=progress, app=app)
    tracemalloc.stop()
    n = result.done
    tenth = max(1, n // 10)
    first = [p for done, p in peaks if done <= max(tenth, peaks[0][0])]
    last = [p for done, p in peaks if done > n - tenth] or first
    return {"letters": n, "batches": len(peaks), "first": max(first) / 2**20,
            "last": max(last) / 2**20, "peak": max(p for _, p in peaks) / 2**20}


def child(options) -> None:
    import django

    django.setup()
    from bench.bench_app import app

    app.loader.import_default_modules()
    run = {"baseline": side_baseline, "celery": side_celery, "replay": side_replay,
           "memory": side_memory}[options.child]
    print("RESULT " + json.dumps(run(app, options)), flush=True)


# -- the parent: seeding, checks, rounds, report -------------------------------------------

def run_child(side: str, options, n: int, profile: str | None = None) -> dict:
    seed(n)
    redis_client().flushdb()
    command = [sys.executable, __file__, "--child", side, "--n", str(n),
               "--batch-size", str(options.batch_size)]
    if profile:
        command += ["--profile", profile]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    outcome = json.loads(lines[-1][len("RESULT "):])
    check(side, n)
    return outcome


def check(side: str, n: int) -> None:
    from recovery.models import DeadLetter, DeadLetterEvent

    published = redis_client().llen(QUEUE)
    if published != n:
        raise SystemExit(f"{side}: expected {n} messages on {QUEUE!r}, found {published}")
    if side in ("replay", "memory"):
        replaying = DeadLetter.objects.filter(status=DeadLetter.Status.REPLAYING,
                                              replay_count=1).count()
        events = DeadLetterEvent.objects.filter(action=DeadLetterEvent.Action.REPLAYED).count()
        if (replaying, events) != (n, n):
            raise SystemExit(f"{side}: {replaying} letters replaying, {events} replayed events; "
                             f"expected {n} of each")


def compare_messages(options) -> None:
    """Letter 1 published by the replay and by the baseline: the same message."""
    run_child("replay", options, 1)
    replayed = oldest_message()
    run_child("baseline", options, 1)
    raw = oldest_message()
    for part in ("headers", "properties", "body", "content-type", "content-encoding"):
        a, b = replayed.get(part), raw.get(part)
        if part == "properties":
            a = {k: v for k, v in a.items() if k not in ("delivery_tag", "delivery_info")}
            b = {k: v for k, v in b.items() if k not in ("delivery_tag", "delivery_info")}
        if a != b:
            raise SystemExit(f"the baseline does not send the replay's message: {part} differ:\n"
                             f"  replay   {a}\n  baseline {b}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="letters per side and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--memory-n", type=int, default=10_000,
                        help="letters in the tracemalloc run (0: skip it)")
    parser.add_argument("--profile", metavar="FILE",
                        help="cProfile the first replay round into FILE (slows that round)")
    parser.add_argument("--celery", action="store_true",
                        help="also time Celery's own publish path (app.send_task loop)")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--child", choices=("baseline", "celery", "replay", "memory"),
                        help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options)
        return
    n = options.n

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    print(f"N={n} parked letters per side and round, {options.rounds} round(s), batch size "
          f"{options.batch_size}, broker {BROKER_URL}, database {DB_URL.rsplit('@', 1)[-1]}")
    compare_messages(options)
    print("check: the baseline publishes the same message as the replay (headers, properties, body)")

    sides = [side for side in SIDES if side != "celery" or options.celery]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_number in range(options.rounds):
        for side in sides if round_number % 2 == 0 else sides[::-1]:
            profile = options.profile if side == "replay" and not runs["replay"] else None
            outcome = run_child(side, options, n, profile)
            runs[side].append(outcome)
            if options.verbose:
                print(f"  round {round_number + 1} {side}: "
                      f"{outcome['letters'] / outcome['seconds']:,.0f} letters/s", flush=True)
    redis_client().flushdb()

    rate = {side: statistics.median(r["letters"] / r["seconds"] for r in runs[side]) for side in sides}
    print(f"{'side':<42} {'letters/s':>10} {'s for N':>8}   runs (letters/s)")
    for side in sides:
        print(f"{SIDES[side]:<42} {rate[side]:>10,.0f} {n / rate[side]:>8.1f}   "
              + ", ".join(f"{r['letters'] / r['seconds']:,.0f}" for r in runs[side]))
    if options.celery:
        print(f"ratio bulk replay / celery send_task loop = {rate['replay'] / rate['celery']:.3f} "
              f"(for scale: celery send_task loop / pre-built publish = "
              f"{rate['celery'] / rate['baseline']:.3f})")
    for r in runs["replay"]:
        m = r["memory"]
        print(f"replay memory (child process): peak RSS {m['first_batch']:.1f} MiB after the first "
              f"batch, {m['tenth']:.1f} MiB at N/10, {m['end']:.1f} MiB at N={n}; "
              f"RSS before bulk() {m['before']:.1f} MiB -> peak growth {m['end'] - m['before']:.1f} MiB")
    if options.memory_n:
        m = run_child("memory", options, options.memory_n)
        redis_client().flushdb()
        print(f"replay tracemalloc ({m['letters']} letters, {m['batches']} batches of "
              f"{options.batch_size}): Python heap peak per batch {m['first']:.2f} MiB in the first "
              f"tenth, {m['last']:.2f} MiB in the last tenth, {m['peak']:.2f} MiB overall")
    ratio = rate["replay"] / rate["baseline"]
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"{verdict}: bulk replay / raw kombu publish = {ratio:.3f} (target >= {TARGET})", flush=True)


if __name__ == "__main__":
    main()
