"""Server time of one dead letter's change page: a normal letter vs hostile ones.

What: GET /admin/recovery/deadletter/<id>/change/ in-process through django.test.Client
(middleware, session, the letter's queries, redaction, template rendering; no network), as
a staff user with only ``view_deadletter`` (the masked page), for:
  normal   a small payload, a one-line message, three attempts
  5 MB     a 5 MB argument and a 1 MB exception message (the page clips each value at
           recovery.core.redaction.SHOWN_MAX_CHARS)
  deep     kwargs and headers nested 10,000 deep (loaded by recovery.core.deepjson, masked
           below recovery.core.redaction.MAX_DEPTH)
Target: the 5 MB page well under 300 ms (median), printed with its ratio to the normal
page. Not a test: timings depend on the machine; run it by hand.

Usage: python bench/change_page.py [--repeat 15]
Environment: BENCH_CHANGE_PAGE_DATABASE_URL (default: BENCH_DATABASE_URL with
"_change_page" appended, i.e. postgres://postgres@127.0.0.1:5432/celery_recovery_bench_change_page).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DB_URL = os.environ.get(
    "BENCH_CHANGE_PAGE_DATABASE_URL",
    os.environ.get("BENCH_DATABASE_URL",
                   "postgres://postgres@127.0.0.1:5432/celery_recovery_bench") + "_change_page",
)
os.environ["DATABASE_URL"] = DB_URL
os.environ.setdefault("CELERY_BROKER_URL", "memory://")  # the page never publishes
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
os.environ["DJANGO_DEBUG"] = "0"
os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

TARGET_MS = 300.0
DEPTH = 10_000


def letters() -> dict[str, int]:
    """The three letters, written afresh; their ids by label."""
    from django.db import connection

    from recovery.models import DeadLetter

    DeadLetter.objects.filter(task_id__startswith="bench-page-").delete()
    history = [{"attempt": n, "at": "2026-12-05T10:00:00", "kind": "dependency",
                "exception_type": "DependencyError", "exception_message": "upstream 503",
                "delay_seconds": 2.0 * n} for n in (1, 2, 3)]
    common = dict(task_name="tasks.tasks.charge_payment", kind="dependency",
                  exception_type="recovery.errors.DependencyError", history=history,
                  traceback="Traceback (most recent call last):\n  ...\nDependencyError: 503\n",
                  fingerprint="b" * 40)
    normal = DeadLetter.objects.create(task_id="bench-page-normal", args=[7, 1250],
                                       kwargs={"card_token": "tok_live_x"},
                                       exception_message="upstream answered 503", **common)
    big = DeadLetter.objects.create(task_id="bench-page-5mb",
                                    args=[7, 1250, "x" * (5 * 1024 * 1024)], kwargs={},
                                    exception_message="m" * (1024 * 1024), **common)
    deep = DeadLetter.objects.create(task_id="bench-page-deep", args=[], kwargs={},
                                     exception_message="too deep", **common)
    deep_json = '{"a": ' + "[" * DEPTH + '"leaf"' + "]" * DEPTH + "}"
    with connection.cursor() as cursor:  # the ORM's json.dumps cannot write it
        cursor.execute("UPDATE recovery_deadletter SET kwargs = %s::jsonb, headers = %s::jsonb "
                       "WHERE id = %s", [deep_json, deep_json, deep.pk])
    return {"normal": normal.pk, "5 MB": big.pk, "deep": deep.pk}


def viewer():
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    user, _ = get_user_model().objects.get_or_create(username="bench-viewer",
                                                     defaults={"is_staff": True})
    user.user_permissions.set(Permission.objects.filter(codename="view_deadletter"))
    return user


def timed(client, url: str, repeat: int) -> tuple[float, int]:
    """(median milliseconds, response bytes) of ``repeat`` GETs after two warm-ups."""
    for _ in range(2):
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), len(response.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    options = parser.parse_args()

    from bench.common import ensure_database

    ensure_database(DB_URL)
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse

    call_command("migrate", verbosity=0)
    client = Client()
    client.force_login(viewer())
    results = {label: timed(client, reverse("admin:recovery_deadletter_change", args=[pk]),
                            options.repeat)
               for label, pk in letters().items()}
    base = results["normal"][0]
    print(f"change page, view-only user, median of {options.repeat} (ms):")
    for label, (ms, size) in results.items():
        print(f"  {label:<7} {ms:8.1f} ms  x{ms / base:5.1f} of normal  {size / 1024:8.0f} KB page")
    verdict = "OK" if results["5 MB"][0] < TARGET_MS else "OVER"
    print(f"5 MB page: {results['5 MB'][0]:.1f} ms, target < {TARGET_MS:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
