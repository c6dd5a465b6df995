"""Server time of the dead-letter admin's change list at 1,000,000 letters on PostgreSQL.

What: GET /admin/recovery/deadletter/ as a superuser, in-process through django.test.Client
(middleware, session and user lookups, the change list's queries, template rendering; no
network, no browser), for the pages an operator opens first:
  unfiltered, filtered by status, by task name, by kind, drilled down by date
  (date_hierarchy: a year, a month, a day), a search by task id, and the second page.
Baseline, in the same run on the same rows: the stock admin, i.e. this admin without
dlq_admin/changelist.py (Django's task-name field filter, ChangeList, paginator and search)
and without index recovery_dl_last_failed (dropped inside a transaction that is rolled back).
Target: median server time < 150 ms on every page (p95 printed too).

How:
  - The letters are seeded once with ``INSERT ... SELECT generate_series`` in chunks (about
    70% resolved, 20% discarded, 8% parked, some replaying and compensated; six kinds; ~50
    task names with a skewed distribution; ~1,500 fingerprints; last_failed_at spread over
    90 days; realistic args, headers, history and tracebacks), then VACUUM ANALYZE. A later
    run reuses them when the table already holds exactly N rows (--reseed forces a new seed).
    The database is separate from the other benchmarks', which truncate the table.
  - Every page: warm-up requests (1 for the baseline, 2 for this admin), then timed ones
    (--baseline-repeat, --repeat); median and p95 (nearest rank) of the wall-clock time of
    ``client.get``, and the speed-up of the medians. DEBUG is off (no SQL log).
  - Then, for each page, the SQL it runs: the number of statements, and the slowest one
    with its time (``connection.execute_wrapper``); --explain prints EXPLAIN ANALYZE of the
    slowest statement of each page of this admin.

Usage: python bench/changelist.py [--n 1000000] [--repeat 10] [--baseline-repeat 3]
           [--reseed] [--explain]
The first run seeds for about 3 minutes; a later run takes about 1.5 minutes, most of it
the baseline (--baseline-repeat 0 skips it).
Environment: BENCH_CHANGELIST_DATABASE_URL (default: BENCH_DATABASE_URL with "_changelist"
appended, i.e. postgres://postgres@127.0.0.1:5432/celery_recovery_bench_changelist).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DB_URL = os.environ.get(
    "BENCH_CHANGELIST_DATABASE_URL",
    os.environ.get("BENCH_DATABASE_URL",
                   "postgres://postgres@127.0.0.1:5432/celery_recovery_bench") + "_changelist",
)
os.environ["DATABASE_URL"] = DB_URL
os.environ.setdefault("CELERY_BROKER_URL", "memory://")  # the admin never publishes here
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
os.environ["DJANGO_DEBUG"] = "0"  # DEBUG would log every query and render debug pages
os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off
os.environ["DJANGO_SECURE_SSL_REDIRECT"] = "0"  # the test client speaks plain HTTP
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

URL = "/admin/recovery/deadletter/"
TARGET_MS = 150.0
CHUNK = 250_000

VERBS = ["charge", "refund", "capture", "sync", "import", "export", "send", "render", "resize",
         "notify"]
NOUNS = ["payment", "invoice", "customer_row", "newsletter_batch", "monthly_report",
         "exchange_rate"]
#: ~50 task names: module.tasks.verb_noun, the first ones far more frequent than the last
TASK_NAMES = [f"{module}.tasks.{verb}_{noun}"
              for module, verbs in (("shop", VERBS[:5]), ("crm", VERBS[3:8]), ("media", VERBS[6:]))
              for verb in verbs for noun in NOUNS[:4]][:50]
KINDS = [("dependency", "recovery.errors.DependencyError", "upstream answered 503"),
         ("data_integrity", "recovery.errors.DataIntegrityError", "row violates constraint"),
         ("resource_exhausted", "recovery.errors.ResourceExhaustedError", "rate limited, retry later"),
         ("timeout", "celery.exceptions.TimeLimitExceeded", "hard time limit exceeded"),
         ("poison", "kombu.exceptions.DecodeError", "message body could not be decoded"),
         ("other", "ValueError", "unexpected value")]


def ensure_database() -> None:
    from bench.common import ensure_database as create_if_missing

    create_if_missing(DB_URL)


def seed(n: int) -> None:
    """N letters, in chunks of one INSERT ... SELECT generate_series each."""
    from django.db import connection

    from recovery.models import DeadLetter, DeadLetterEvent

    letters, events = DeadLetter._meta.db_table, DeadLetterEvent._meta.db_table
    started = time.perf_counter()
    task_names = "(ARRAY[" + ",".join(f"'{name}'" for name in TASK_NAMES) + "])"
    kinds = "(ARRAY[" + ",".join(f"'{k}'" for k, _, _ in KINDS) + "])"
    types = "(ARRAY[" + ",".join(f"'{t}'" for _, t, _ in KINDS) + "])"
    messages = "(ARRAY[" + ",".join(f"'{m}'" for _, _, m in KINDS) + "])"
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {letters}, {events} RESTART IDENTITY CASCADE")
        cursor.execute("SELECT setseed(0.42)")
        for low in range(1, n + 1, CHUNK):
            high = min(n, low + CHUNK - 1)
            cursor.execute(
                f"""
                INSERT INTO {letters} (
                    task_id, task_name, args, kwargs, headers, raw_body, content_type, status,
                    kind, permanent, reason, exception_type, exception_message, traceback,
                    attempts, replay_count, history, queue, worker, fingerprint,
                    first_failed_at, last_failed_at, created_at, updated_at)
                SELECT
                    r.task_id, r.task_name, jsonb_build_array(g, (r.x * 100000)::int),
                    jsonb_build_object('currency', 'EUR'),
                    jsonb_build_object('root_id', r.task_id, 'routing_key', 'celery',
                                       'exchange', '', 'origin', 'gen' || mod(g, 97) || '@web-1'),
                    '', '', r.status, r.kind, r.k <> 2,
                    'permanent failure: parked (' || r.kind || ')', {types}[r.k + 1],
                    {messages}[r.k + 1] || ' (order ' || g || ', attempt ' || r.attempts || ')',
                    'Traceback (most recent call last):' || chr(10)
                      || '  File "celery/app/trace.py", line 453, in trace_task' || chr(10)
                      || '    R = retval = fun(*args, **kwargs)' || chr(10)
                      || '  File "recovery/task.py", line 180, in __call__' || chr(10)
                      || '    return self.run(*args, **kwargs)' || chr(10)
                      || '  File "' || replace(r.task_name, '.', '/') || '.py", line '
                      || (20 + r.t * 3) || ', in ' || split_part(r.task_name, '.', 3) || chr(10)
                      || '    response = client.post(url, json=payload, timeout=10)' || chr(10)
                      || '  File "requests/api.py", line 115, in post' || chr(10)
                      || '    return request("post", url, data=data, json=json, **kwargs)'
                      || chr(10) || {types}[r.k + 1] || ': ' || {messages}[r.k + 1],
                    r.attempts, (r.status IN ('replaying', 'resolved') AND r.x < 0.3)::int,
                    (SELECT jsonb_agg(jsonb_build_object(
                        'at', to_char(r.last_failed_at - (r.attempts - a) * interval '30 seconds',
                                      'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
                        'attempt', a, 'replay', 0, 'kind', r.kind,
                        'exception_type', {types}[r.k + 1],
                        'exception_message', {messages}[r.k + 1],
                        'delay_seconds', CASE WHEN a < r.attempts THEN 2 * a END))
                     FROM generate_series(1, r.attempts) AS a),
                    'celery', 'celery@worker-' || mod(g, 8), r.fingerprint,
                    r.last_failed_at - r.attempts * interval '30 seconds', r.last_failed_at,
                    r.last_failed_at, r.last_failed_at
                FROM (SELECT g, random() AS x, random() AS y, random() AS z, random() AS w
                      FROM generate_series({low}, {high}) AS g) AS u,
                LATERAL (SELECT
                    md5('changelist' || u.g)::uuid::text AS task_id,
                    -- skewed: the first task names are far more frequent than the last
                    least(49, floor(50 * u.y * u.y))::int AS t,
                    CASE WHEN u.z < 0.70 THEN 'resolved' WHEN u.z < 0.90 THEN 'discarded'
                         WHEN u.z < 0.98 THEN 'parked' WHEN u.z < 0.99 THEN 'replaying'
                         ELSE 'compensated' END AS status,
                    least(5, floor(6 * u.w * u.w))::int AS k,
                    1 + floor(u.x * 4)::int AS attempts,
                    now() - (u.x * 90) * interval '1 day' AS last_failed_at
                ) AS v,
                LATERAL (SELECT
                    v.task_id, {task_names}[v.t + 1] AS task_name, v.status,
                    {kinds}[v.k + 1] AS kind, v.k, v.t, v.attempts, v.last_failed_at, u.x,
                    -- 5 variants of the same failure per task and kind: ~1,500 groups
                    substr(md5(v.t || '-' || v.k || '-' || floor(u.x * 5)) || md5('fp'), 1, 40)
                        AS fingerprint
                ) AS r
                """
            )
            print(f"  seeded {high:,} / {n:,} letters ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    vacuum()
    print(f"  VACUUM ANALYZE done ({time.perf_counter() - started:.0f} s)", flush=True)


def vacuum() -> None:
    from django.db import connection

    from recovery.models import DeadLetter

    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {DeadLetter._meta.db_table}")


def pages(sample) -> dict[str, str]:
    """Name -> query string, with values taken from the seeded data."""
    day = sample["day"]
    return {
        "unfiltered": "",
        "status=parked": "?status__exact=parked",
        f"task_name={sample['task_name'].split('.tasks.')[1]}": f"?task_name={sample['task_name']}",
        "kind=timeout": "?kind__exact=timeout",
        "date: a year": f"?last_failed_at__year={day.year}",
        "date: a month": f"?last_failed_at__month={day.month}&last_failed_at__year={day.year}",
        "date: a day": (f"?last_failed_at__day={day.day}&last_failed_at__month={day.month}"
                        f"&last_failed_at__year={day.year}"),
        "search by task id": f"?q={sample['task_id']}",
        "second page": "?p=2",
    }


def sample_values() -> dict:
    from datetime import timedelta

    from django.db.models import Max
    from django.utils import timezone

    from recovery.models import DeadLetter

    latest = DeadLetter.objects.aggregate(last=Max("last_failed_at"))["last"]
    day = timezone.localtime(latest - timedelta(days=40)).date()  # a day in the middle
    letter = DeadLetter.objects.filter(pk=DeadLetter.objects.order_by("pk").values("pk")[:1]).get()
    return {"day": day, "task_name": TASK_NAMES[7], "task_id": letter.task_id}


def superuser():
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True})
    return user


def measure(client, query: str, repeat: int, warmups: int = 2) -> list[float]:
    for _ in range(warmups):
        response = client.get(URL + query)
        if response.status_code != 200:
            raise SystemExit(f"GET {URL + query} answered {response.status_code}")
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(URL + query)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"GET {URL + query} answered {response.status_code}")
    return times


@contextmanager
def stock_admin():
    """The baseline: this admin as it was before dlq_admin/changelist.py and index
    recovery_dl_last_failed (Django's field filter for task_name, its ChangeList,
    paginator and search), inside a transaction that is rolled back."""
    from django.contrib import admin as django_admin
    from django.db import connection, transaction

    from dlq_admin.changelist import TaskNameFilter
    from recovery.models import DeadLetter

    model_admin = django_admin.site._registry[DeadLetter]
    stock = {
        "list_filter": tuple("task_name" if f is TaskNameFilter else f
                             for f in model_admin.list_filter),
        "paginator": django_admin.ModelAdmin.paginator,
        "get_changelist": types.MethodType(django_admin.ModelAdmin.get_changelist, model_admin),
        "get_search_results": types.MethodType(django_admin.ModelAdmin.get_search_results,
                                               model_admin),
    }
    vars(model_admin).update(stock)
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("DROP INDEX IF EXISTS recovery_dl_last_failed")
            yield
            transaction.set_rollback(True)
    finally:
        for name in stock:
            vars(model_admin).pop(name, None)


def run_pages(client, sample, repeat: int, warmups: int) -> dict[str, dict]:
    results = {}
    for name, query in pages(sample).items():
        times = measure(client, query, repeat, warmups)
        statements = queries_of(client, query)
        results[name] = {
            "median": statistics.median(times), "p95": nearest_rank(times, 0.95),
            "queries": len(statements), "slowest": max(statements, key=lambda s: s[0]),
        }
        print(".", end="", flush=True)
    print()
    return results


def queries_of(client, query: str) -> list[tuple[float, str, tuple]]:
    """(ms, sql, params) of every statement one request runs."""
    from django.db import connection

    seen = []

    def timed(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            seen.append(((time.perf_counter() - started) * 1000, sql, params))

    with connection.execute_wrapper(timed):
        client.get(URL + query)
    return seen


def explain(sql: str, params) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="letters in the table")
    parser.add_argument("--repeat", type=int, default=10, help="timed requests per page")
    parser.add_argument("--reseed", action="store_true", help="seed again even if N rows exist")
    parser.add_argument("--baseline-repeat", type=int, default=3,
                        help="timed requests per page for the stock-admin baseline (0: skip it)")
    parser.add_argument("--explain", action="store_true",
                        help="EXPLAIN ANALYZE the slowest query of every page")
    options = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db.models import Count
    from django.test import Client

    from recovery.models import DeadLetter

    call_command("migrate", verbosity=0)
    existing = DeadLetter.objects.count()
    if existing != options.n or options.reseed:
        print(f"seeding {options.n:,} letters into {DB_URL.rsplit('@', 1)[-1]} "
              f"(found {existing:,})", flush=True)
        seed(options.n)
    else:
        vacuum()  # ANALYZE (and a visibility map for index-only scans) before measuring

    client = Client()
    client.force_login(superuser())
    sample = sample_values()
    by_status = dict(DeadLetter.objects.order_by().values_list("status").annotate(n=Count("pk")))
    print(f"{options.n:,} letters ({', '.join(f'{k} {v:,}' for k, v in sorted(by_status.items()))}), "
          f"{len(TASK_NAMES)} task names, database {DB_URL.rsplit('@', 1)[-1]}")
    before = None
    if options.baseline_repeat:
        print(f"baseline (stock admin, no last_failed_at index): {options.baseline_repeat} timed "
              f"requests per page after 1 warm-up ", end="", flush=True)
        with stock_admin():
            before = run_pages(client, sample, options.baseline_repeat, warmups=1)
    print(f"this admin: {options.repeat} timed requests per page after 2 warm-ups ", end="", flush=True)
    after = run_pages(client, sample, options.repeat, warmups=2)

    print(f"{'page':<30} {'before ms':>9} {'median ms':>9} {'p95 ms':>7} {'speed-up':>8} "
          f"{'queries':>9} {'slowest SQL ms':>15}  verdict")
    misses = []
    for name, now in after.items():
        was = before[name] if before else None
        verdict = "ok" if now["median"] < TARGET_MS else "MISS"
        if verdict == "MISS":
            misses.append(name)
        queries = (f"{was['queries']}->" if was else "") + str(now["queries"])
        slowest = (f"{was['slowest'][0]:.0f}->" if was else "") + f"{now['slowest'][0]:.1f}"
        print(f"{name:<30} {was['median'] if was else float('nan'):>9.1f} {now['median']:>9.1f} "
              f"{now['p95']:>7.1f} "
              f"{(was['median'] / now['median']) if was else float('nan'):>7.1f}x "
              f"{queries:>9} {slowest:>15}  {verdict}", flush=True)
    for label, results in (("baseline", before), ("this admin", after)):
        if not results:
            continue
        print(f"slowest statement of each page, {label}:")
        for name, result in results.items():
            ms, sql, params = result["slowest"]
            shown = " ".join((sql % tuple(repr(p) for p in params) if params else sql).split())
            shown = re.sub(r'SELECT "recovery_deadletter"\."id", .*? FROM', "SELECT <all columns> FROM", shown)
            shown = re.sub(r"datetime\.datetime\((\d+), (\d+), (\d+), 0, 0, tzinfo=[^)]*\)\)",
                           r"'\1-\2-\3'", shown)
            print(f"  {name} ({ms:.1f} ms): {shown[:300]}{' ...' if len(shown) > 300 else ''}")
            if options.explain and label == "this admin":
                print("    " + explain(sql, params).replace("\n", "\n    "))
    if misses:
        print(f"MISS: {len(misses)} page(s) at or above {TARGET_MS:.0f} ms median: {', '.join(misses)}")
    else:
        print(f"PASS: every page under {TARGET_MS:.0f} ms median server time at {options.n:,} letters"
              + (f" (stock admin: {sum(r['median'] >= TARGET_MS for r in before.values())} of "
                 f"{len(before)} pages over)" if before else ""))


# -- the harness's figures (bench/run.py) -------------------------------------------------

WRITER_PREFIX = "writer-"


@contextmanager
def parking_writer(rate: float):
    """``bench/park_writer.py`` parking ``rate`` letters/s into this database meanwhile;
    yields a dict that holds the writer's own report once it has stopped."""
    import signal
    import subprocess

    report: dict[str, str] = {}
    writer = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("park_writer.py")), str(rate)],
        env={**os.environ, "DATABASE_URL": DB_URL}, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # Django set up and the first letters in before the first request
        if writer.poll() is not None:
            raise SystemExit(f"the parking writer exited at once (status {writer.returncode})")
        yield report
    finally:
        writer.send_signal(signal.SIGTERM)
        out, _ = writer.communicate(timeout=30)
        report["line"] = out.strip().splitlines()[-1] if out.strip() else "writer: no report"


def forget_writer_letters() -> None:
    """Delete what the writer parked (and the incident its one failure opened), so the next
    run finds exactly N seeded rows again."""
    from recovery.models import DeadLetter, Incident

    DeadLetter.objects.filter(task_id__startswith=WRITER_PREFIX).delete()
    Incident.objects.filter(task_name="bench.park_writer").delete()


def figures(mode: str) -> list:
    """The change list's p95 per page at N letters while a writer parks letters."""
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    from bench.plan import sizes
    from bench.rounds import Figure
    from recovery.models import DeadLetter

    plan = sizes("changelist", mode)
    call_command("migrate", verbosity=0)
    forget_writer_letters()
    if DeadLetter.objects.count() != plan["n"]:
        print(f"seeding {plan['n']:,} letters into {DB_URL.rsplit('@', 1)[-1]}", flush=True)
        seed(plan["n"])
    else:
        vacuum()
    client = Client()
    client.force_login(superuser())
    sample = sample_values()
    print(f"change list at {plan['n']:,} letters, {plan['repeat']} timed requests per page, "
          f"a writer parking {plan['writer_rate']:.0f} letters/s ", end="", flush=True)
    try:
        with parking_writer(plan["writer_rate"]) as writer:
            results = {name: measure(client, query, plan["repeat"], warmups=2)
                       for name, query in pages(sample).items()}
    finally:
        forget_writer_letters()
    print(writer["line"], flush=True)
    return [Figure(name=f"change list p95: {name}", value=nearest_rank(times, 0.95), unit="ms",
                   target_op="<", target=TARGET_MS, spread=(min(times), max(times)),
                   detail=f"N={plan['n']:,}, {len(times)} requests, median "
                          f"{statistics.median(times):.1f} ms; {writer['line']}")
            for name, times in results.items()]


if __name__ == "__main__":
    main()
