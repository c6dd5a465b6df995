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
  - Each round runs every side back to back, the next round swaps who goes first
    (bench/rounds.py). Figure: the median of the per-round ratios replay letters/s /
    baseline letters/s, with their min–max; target >= 1.0.
  - Memory of the replay, from its timed runs: the process's peak RSS (ru_maxrss) once N/10
    letters are done against once all N are; figure: the median per-round ratio RSS at N /
    RSS at N/10, target <= 1.1 (flat). With --memory-n (the script alone), one more, untimed
    replay under tracemalloc, with the traced peak reset after every batch: the Python heap
    peak per batch over the first tenth against the last tenth.

Usage: python bench/bulk_replay.py [--n 100000] [--rounds 5] [--batch-size 500]
           [--memory-n 0] [--celery] [--profile FILE] [--verbose]
The default run takes about 20 minutes on a 2-core VM (--celery adds about 2 per round).
bench/run.py calls figures(mode) with the sizes of bench/plan.py.
Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/celery_recovery_bench),
BENCH_BROKER_URL (default redis://127.0.0.1:6379/13; the database is flushed every round).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

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

# The harness's pure modules: no Django, so they may come before django.setup().
from bench.plan import sizes  # noqa: E402
from bench.report import figures_table  # noqa: E402
from bench.rounds import Figure, interleave, ratio_figure, ratio_spread, summarise  # noqa: E402

TASK = "bench.fail_recovery"
QUEUE = "bench"
ORIGIN = "gen4242@bench-producer"
TARGET = 1.0
RSS_TARGET = 1.1  # RSS at N over RSS at N/10: flat
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
        # A replay takes only an allow-list from the letter (recovery.operations.replay_options):
        # its origin and reply_to are the publishing process's own, as with app.send_task;
        # so are the baseline's (compare_messages leaves both out).
        headers, properties, body, _ = app.amqp.as_task_v2(
            task_id, name, tuple(args), kwargs, reply_to=app.thread_oid)
        headers[hdr.REPLAY] = replay_count + 1
        messages.append((body, dict(
            exchange="", routing_key=QUEUE, serializer="json", delivery_mode=2,
            headers=headers, priority=extra.get("priority"), **properties,
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

def run_child(side: str, options: Any, n: int, profile: str | None = None) -> dict:
    seed(n)
    redis_client().flushdb()
    command = [sys.executable, __file__, "--child", side, "--n", str(n),
               "--batch-size", str(options.batch_size)]
    if profile:
        command += ["--profile", profile]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
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


def compare_messages(options: Any) -> None:
    """Letter 1 published by the replay and by the baseline: the same message."""
    run_child("replay", options, 1)
    replayed = oldest_message()
    run_child("baseline", options, 1)
    raw = oldest_message()
    # Each side's own: the broker's delivery fields, and the origin ("gen<pid>@host") and
    # reply_to (the app's oid), which name the process that published (both sides run in
    # a child of their own).
    own = {"headers": ("origin",),
           "properties": ("delivery_tag", "delivery_info", "origin", "reply_to")}
    for part in ("headers", "properties", "body", "content-type", "content-encoding"):
        a, b = replayed.get(part), raw.get(part)
        if part in own:
            a = {k: v for k, v in a.items() if k not in own[part]}
            b = {k: v for k, v in b.items() if k not in own[part]}
        if a != b:
            raise SystemExit(f"the baseline does not send the replay's message: {part} differ:\n"
                             f"  replay   {a}\n  baseline {b}")


def prepare() -> None:
    """The benchmark's database exists and is migrated; Django is set up."""
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def run(options: Any, verbose: bool = False) -> list[Figure]:
    """Interleaved rounds of the sides; the throughput ratio(s) and the RSS figure.

    ``options`` carries n, rounds, batch_size, and optionally celery and profile.
    """
    prepare()
    n = options.n
    compare_messages(options)
    sides = [side for side in SIDES if side != "celery" or getattr(options, "celery", False)]
    profiled: list[bool] = []

    def measure(side: str) -> Callable[[], dict]:
        def once() -> dict:
            profile = getattr(options, "profile", None) if side == "replay" and not profiled else None
            if profile:
                profiled.append(True)
            outcome = run_child(side, options, n, profile)
            if verbose:
                print(f"  {side}: {outcome['letters'] / outcome['seconds']:,.0f} letters/s", flush=True)
            return outcome

        return once

    rounds = interleave([measure(side) for side in sides], options.rounds)
    redis_client().flushdb()
    at = {side: i for i, side in enumerate(sides)}

    def rate(outcome: dict) -> float:
        return outcome["letters"] / outcome["seconds"]

    def rates(side: str) -> str:
        return ", ".join(f"{rate(r[at[side]]):,.0f}" for r in rounds)

    replay, baseline = at["replay"], at["baseline"]
    figures = [ratio_figure(
        "bulk replay / raw kombu publish", ratio_spread(rounds, lambda *r: rate(r[replay]) / rate(r[baseline])),
        ">=", TARGET, f"N={n:,}, {options.rounds} rounds; letters/s replay {rates('replay')}; "
                      f"kombu publish {rates('baseline')}")]
    if "celery" in at:
        figures.append(ratio_figure(
            "bulk replay / celery send_task loop",
            ratio_spread(rounds, lambda *r: rate(r[replay]) / rate(r[at["celery"]])), ">=", TARGET,
            f"letters/s celery send_task {rates('celery')}"))
    memory = [r[replay]["memory"] for r in rounds]
    figures.append(ratio_figure(
        "bulk replay peak RSS at N / at N/10", summarise([m["end"] / m["tenth"] for m in memory]),
        "<=", RSS_TARGET, f"N={n:,}; peak RSS MiB at N/10 -> N per round: "
                          + ", ".join(f"{m['tenth']:.1f} -> {m['end']:.1f}" for m in memory)))
    return figures


def figures(mode: str) -> list[Figure]:
    """The harness's entry point (bench/run.py): the figures at the sizes of ``mode``."""
    return run(SimpleNamespace(**sizes("bulk_replay", mode)))


def main() -> None:
    full = sizes("bulk_replay", "full")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=full["n"], help="letters per side and round")
    parser.add_argument("--rounds", type=int, default=full["rounds"])
    parser.add_argument("--batch-size", type=int, default=full["batch_size"])
    parser.add_argument("--memory-n", type=int, default=0,
                        help="letters in an extra tracemalloc run (0: skip it)")
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
    print(f"N={options.n} parked letters per side and round, {options.rounds} round(s), batch size "
          f"{options.batch_size}, broker {BROKER_URL}, database {DB_URL.rsplit('@', 1)[-1]}", flush=True)
    results = run(options, verbose=options.verbose)
    if options.memory_n:
        m = run_child("memory", options, options.memory_n)
        redis_client().flushdb()
        print(f"replay tracemalloc ({m['letters']} letters, {m['batches']} batches of "
              f"{options.batch_size}): Python heap peak per batch {m['first']:.2f} MiB in the first "
              f"tenth, {m['last']:.2f} MiB in the last tenth, {m['peak']:.2f} MiB overall")
    print(figures_table(results))


if __name__ == "__main__":
    main()
