"""Retention (which letters a purge deletes, and the purge) and exports, on real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import threading
import uuid
from datetime import datetime, timedelta

import pytest
from celery import Celery
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config.celery import app
from recovery.store import export, retention
from recovery.core import redaction
from recovery.models import DeadLetter, DeadLetterEvent, DeliveryCount
from recovery.core.redaction import MASK

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"
CARD_TASK = "tests.recovery.charge_card"


@app.task(name=CARD_TASK)
def charge_card(order_id, card_token, amount_cents):
    """A task whose second positional parameter is a secret by its name."""
    return None


def make(n: int, status: str = DeadLetter.Status.PARKED, closed_days_ago: float = 0,
         **overrides) -> DeadLetter:
    """A letter last updated ``closed_days_ago`` days ago."""
    values = dict(task_id=f"t-{n}", task_name=TASK, args=[n, 100], kwargs={}, status=status,
                  fingerprint="a" * 40, kind="dependency", exception_type="DependencyError",
                  exception_message="declined")
    values.update(overrides)
    letter = DeadLetter.objects.create(**values)
    if closed_days_ago:
        # update() leaves auto_now alone: the letter looks closed that long ago
        DeadLetter.objects.filter(pk=letter.pk).update(
            updated_at=timezone.now() - timedelta(days=closed_days_ago))
    return letter


def task_ids(queryset) -> set[str]:
    return set(queryset.values_list("task_id", flat=True))


# -- the plan: which letters a purge may delete ---------------------------------------------


def test_by_default_closed_letters_are_kept_for_their_statuses_retention():
    # Given letters of every status, closed at different times
    make(1, "resolved", 31)
    make(2, "resolved", 29)
    make(3, "discarded", 31)
    make(4, "discarded", 29)
    make(5, "compensated", 91)
    make(6, "compensated", 89)
    make(7, "parked", 400)
    make(8, "replaying", 400)
    # When a purge is planned without an age
    plan = retention.plan()
    # Then resolved and discarded letters go after 30 days, compensated after 90,
    # and parked or replaying letters never
    assert task_ids(plan.queryset) == {"t-1", "t-3", "t-5"}
    assert [status for status, _ in plan.cutoffs] == ["resolved", "discarded", "compensated"]
    cutoffs = dict(plan.cutoffs)
    now = timezone.now()
    assert abs((now - cutoffs["resolved"]) - timedelta(days=30)) < timedelta(minutes=1)
    assert abs((now - cutoffs["compensated"]) - timedelta(days=90)) < timedelta(minutes=1)
    assert "resolved letters closed before" in plan.describe()
    assert "compensated letters closed before" in plan.describe()


def test_an_explicit_age_applies_to_every_closed_status_but_never_to_parked_letters():
    make(1, "resolved", 8)
    make(2, "discarded", 8)
    make(3, "compensated", 8)
    make(4, "resolved", 6)
    make(5, "parked", 400)
    make(6, "replaying", 400)
    plan = retention.plan(older_than=timezone.now() - timedelta(days=7))
    assert task_ids(plan.queryset) == {"t-1", "t-2", "t-3"}


def test_retention_days_come_from_the_settings(settings):
    settings.RECOVERY = {**settings.RECOVERY,
                         "RETENTION_DAYS": {"resolved": 1, "discarded": 60, "compensated": None}}
    make(1, "resolved", 2)
    make(2, "discarded", 31)
    make(3, "discarded", 61)
    make(4, "compensated", 1000)
    plan = retention.plan()
    # compensated: None keeps them until a purge names an age
    assert task_ids(plan.queryset) == {"t-1", "t-3"}
    assert [status for status, _ in plan.cutoffs] == ["resolved", "discarded"]
    named = retention.plan(older_than=timezone.now() - timedelta(days=500))
    assert task_ids(named.queryset) == {"t-4"}


def test_one_status_and_a_narrower_queryset_narrow_the_plan():
    make(1, "resolved", 31)
    make(2, "discarded", 31)
    make(3, "resolved", 31, task_name="tasks.tasks.fetch_exchange_rate")
    assert task_ids(retention.plan(status="resolved").queryset) == {"t-1", "t-3"}
    narrowed = retention.plan(DeadLetter.objects.filter(task_name=TASK))
    assert task_ids(narrowed.queryset) == {"t-1", "t-2"}
    assert task_ids(narrowed.narrowed(DeadLetter.objects.filter(task_id="t-2")).queryset) == {"t-2"}


def test_parked_letters_are_purged_only_when_asked_for_and_given_an_age():
    make(1, "parked", 100)
    make(2, "parked", 10)
    make(3, "resolved", 100)
    with pytest.raises(retention.RetentionError, match="refusing to purge parked letters"):
        retention.plan(status="parked")
    with pytest.raises(retention.RetentionError, match="refusing to purge parked letters"):
        retention.plan(status="parked", older_than=timezone.now() - timedelta(days=1))
    with pytest.raises(retention.RetentionError, match="needs an explicit age"):
        retention.plan(status="parked", include_parked=True)
    with pytest.raises(retention.RetentionError, match="needs an explicit age"):
        retention.plan(include_parked=True)
    old = timezone.now() - timedelta(days=90)
    assert task_ids(retention.plan(status="parked", include_parked=True,
                                   older_than=old).queryset) == {"t-1"}
    assert task_ids(retention.plan(include_parked=True, older_than=old).queryset) == {"t-1", "t-3"}


def test_replaying_letters_are_never_purged():
    make(1, "replaying", 400)
    long_ago = timezone.now() - timedelta(days=1)
    with pytest.raises(retention.RetentionError, match="replaying letters are in flight"):
        retention.plan(status="replaying")
    with pytest.raises(retention.RetentionError, match="replaying letters are in flight"):
        retention.plan(status="replaying", include_parked=True, older_than=long_ago)
    assert not retention.plan(include_parked=True, older_than=long_ago).queryset.exists()


# -- the purge --------------------------------------------------------------------------------


def test_purge_deletes_in_batches_with_the_letters_audit_events():
    # Given 25 letters past their retention and two within it, each with an audit event
    for n in range(25):
        letter = make(n, "resolved", 40)
        DeadLetterEvent.objects.create(letter=letter, action="resolved", actor="bob")
    kept = [make(100, "resolved", 1), make(101, "parked", 400)]
    for letter in kept:
        DeadLetterEvent.objects.create(letter=letter, action="replay_failed", actor="bob")
    seen = []
    # When they are purged in batches of ten
    deleted = retention.purge(retention.plan(), batch_size=10, progress=seen.append)
    # Then the old letters are gone with their events, batch by batch
    assert deleted == 25
    assert seen == [10, 20, 25]
    assert task_ids(DeadLetter.objects.all()) == {"t-100", "t-101"}
    assert set(DeadLetterEvent.objects.values_list("letter_id", flat=True)) == {k.pk for k in kept}
    # And a second purge has nothing left to do
    assert retention.purge(retention.plan(), batch_size=10) == 0


def test_purge_forgets_stale_delivery_counts_and_keeps_recent_ones(settings):
    DeliveryCount.objects.create(task_id="old", deliveries=2)
    DeliveryCount.objects.create(task_id="recent", deliveries=1)
    DeliveryCount.objects.create(task_id="five-days", deliveries=1)
    DeliveryCount.objects.filter(task_id="old").update(updated_at=timezone.now() - timedelta(days=8))
    DeliveryCount.objects.filter(task_id="five-days").update(
        updated_at=timezone.now() - timedelta(days=5))
    retention.purge(retention.plan())
    assert set(DeliveryCount.objects.values_list("task_id", flat=True)) == {"recent", "five-days"}
    settings.RECOVERY = {**settings.RECOVERY, "DELIVERY_COUNT_RETENTION_DAYS": 3}
    retention.purge(retention.plan())
    assert set(DeliveryCount.objects.values_list("task_id", flat=True)) == {"recent"}


def test_a_letter_reparked_between_the_plan_and_the_purge_is_kept():
    make(1, "resolved", 40)
    make(2, "resolved", 40)
    plan = retention.plan()
    # The same task id failed again: parking reopens the row
    DeadLetter.objects.filter(task_id="t-2").update(status="parked")
    assert retention.purge(plan) == 1
    assert task_ids(DeadLetter.objects.all()) == {"t-2"}


def test_a_letter_locked_by_another_transaction_is_skipped():
    # Given three letters past retention, one of them held by an operator's transaction
    for n in range(3):
        make(n, "resolved", 40)
    held = DeadLetter.objects.get(task_id="t-1")
    locked, release, failures = threading.Event(), threading.Event(), []

    def operator():
        try:
            with transaction.atomic():
                DeadLetter.objects.select_for_update().get(pk=held.pk)
                locked.set()
                release.wait(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=operator)
    thread.start()
    try:
        assert locked.wait(timeout=10)
        # When a purge runs meanwhile
        deleted = retention.purge(retention.plan(), batch_size=2)
    finally:
        release.set()
        thread.join(timeout=30)
    # Then it deletes the others without waiting for the lock, and leaves that one
    assert not failures
    assert deleted == 2
    assert task_ids(DeadLetter.objects.all()) == {"t-1"}
    # And the next purge, with the lock gone, takes it
    assert retention.purge(retention.plan()) == 1


# -- exports ----------------------------------------------------------------------------------


@pytest.fixture
def secret_letters():
    """Secrets by positional parameter name, in a nested dict, in kwargs, headers, raw body
    and in the audit trail's payload snapshots."""
    card = DeadLetter.objects.create(
        task_id="card-1", task_name=CARD_TASK, args=[7, "tok_live_4242", 1_500],
        kwargs={"api_token": "at_secret", "note": "first order"},
        headers={"headers": {"authorization": "Bearer sk_live_abc", "trace": "tr-1"}},
        raw_body='{"api_key": "ak_999", "n": 1}', fingerprint="e" * 40,
        exception_message='declined, "hard"\nline two', history=[{"attempt": 1, "kind": "dependency"}],
        permanent=True,
    )
    DeadLetterEvent.objects.create(
        letter=card, action="edited", actor="alice",
        before={"args": [7, "tok_old_1111", 1_500], "kwargs": {"api_token": "at_old"}},
        after={"args": [7, "tok_live_4242", 1_500], "kwargs": {"api_token": "at_secret"}},
    )
    row = DeadLetter.objects.create(
        task_id="row-1", task_name="tasks.tasks.import_customer_row",
        args=[{"id": 3, "email": "a@b.c", "password": "hunter2"}], kwargs={},
        fingerprint="e" * 40,
    )
    return card, row


SECRETS = ("tok_live_4242", "tok_old_1111", "at_secret", "at_old", "sk_live_abc", "ak_999",
           "hunter2")


def jsonl(queryset, **options) -> tuple[str, list[dict]]:
    out = io.StringIO()
    written = export.write_jsonl(queryset, out, **options)
    text = out.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert written == len(records)
    return text, records


def test_jsonl_masks_every_secret_and_keeps_everything_else(secret_letters):
    card, row = secret_letters
    text, [card_record, row_record] = jsonl(DeadLetter.objects.order_by("pk"))
    for secret in SECRETS:
        assert secret not in text
    assert card_record["id"] == card.pk and card_record["task_id"] == "card-1"
    assert card_record["args"] == [7, MASK, 1_500]
    assert card_record["kwargs"] == {"api_token": MASK, "note": "first order"}
    assert card_record["headers"] == {"headers": {"authorization": MASK, "trace": "tr-1"}}
    assert json.loads(card_record["raw_body"]) == {"api_key": MASK, "n": 1}
    assert card_record["exception_message"] == 'declined, "hard"\nline two'
    assert card_record["history"] == [{"attempt": 1, "kind": "dependency"}]
    [event] = card_record["events"]
    assert (event["action"], event["actor"]) == ("edited", "alice")
    assert event["before"] == {"args": [7, MASK, 1_500], "kwargs": {"api_token": MASK}}
    assert event["after"] == {"args": [7, MASK, 1_500], "kwargs": {"api_token": MASK}}
    assert row_record["args"] == [{"id": 3, "email": "a@b.c", "password": MASK}]
    assert row_record["events"] == []
    # Every field of the model is there
    assert {f.attname for f in DeadLetter._meta.fields} <= set(card_record)
    # The stored payload keeps the real values.
    card.refresh_from_db()
    assert card.args[1] == "tok_live_4242"


def test_jsonl_reveals_secrets_when_asked_to(secret_letters):
    card, _ = secret_letters
    text, [card_record, row_record] = jsonl(DeadLetter.objects.order_by("pk"), reveal=True)
    for secret in SECRETS:
        assert secret in text
    assert card_record["args"] == [7, "tok_live_4242", 1_500]
    assert card_record["raw_body"] == '{"api_key": "ak_999", "n": 1}'
    assert card_record["events"][0]["before"] == {"args": [7, "tok_old_1111", 1_500],
                                                  "kwargs": {"api_token": "at_old"}}
    assert row_record["args"][0]["password"] == "hunter2"


def test_jsonl_without_events_leaves_the_audit_trail_out(secret_letters):
    _, records = jsonl(DeadLetter.objects.order_by("pk"), events=False)
    assert all("events" not in record for record in records)


def test_csv_has_one_header_and_one_row_per_letter_that_parse_back(secret_letters):
    card, row = secret_letters
    out = io.StringIO(newline="")
    assert export.write_csv(DeadLetter.objects.order_by("pk"), out) == 2
    text = out.getvalue()
    for secret in SECRETS:
        assert secret not in text
    reader = csv.reader(io.StringIO(text, newline=""))
    header, *rows = list(reader)
    assert tuple(header) == export.CSV_COLUMNS
    assert len(rows) == 2
    card_row, row_row = (dict(zip(header, r)) for r in rows)
    assert card_row["id"] == str(card.pk) and card_row["task_name"] == CARD_TASK
    assert card_row["status"] == "parked" and card_row["permanent"] == "True"
    assert card_row["exception_message"] == 'declined, "hard"\nline two'
    assert json.loads(card_row["args"]) == [7, MASK, 1_500]
    assert json.loads(card_row["kwargs"]) == {"api_token": MASK, "note": "first order"}
    assert json.loads(card_row["headers"]) == {"headers": {"authorization": MASK, "trace": "tr-1"}}
    assert json.loads(card_row["history"]) == [{"attempt": 1, "kind": "dependency"}]
    assert datetime.fromisoformat(card_row["last_failed_at"]) == card.last_failed_at
    assert datetime.fromisoformat(card_row["created_at"]) == card.created_at
    assert json.loads(row_row["args"]) == [{"id": 3, "email": "a@b.c", "password": MASK}]
    assert row_row["queue"] == "" and row_row["traceback"] == ""


def test_csv_reveals_secrets_when_asked_to(secret_letters):
    out = io.StringIO(newline="")
    export.write_csv(DeadLetter.objects.order_by("pk"), out, reveal=True)
    rows = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert json.loads(rows[0]["args"]) == [7, "tok_live_4242", 1_500]
    assert json.loads(rows[1]["args"])[0]["password"] == "hunter2"


class Recorder(io.StringIO):
    """Remembers how many queries had run when each line was written."""

    def __init__(self, queries: CaptureQueriesContext):
        super().__init__()
        self.queries = queries
        self.at_write: list[int] = []

    def write(self, text: str) -> int:
        self.at_write.append(len(self.queries.captured_queries))
        return super().write(text)


def test_exports_stream_thousands_of_letters_one_chunk_at_a_time():
    # Given 2,000 letters, each with an audit event
    letters = DeadLetter.objects.bulk_create([
        DeadLetter(task_id=f"bulk-{i}", task_name=TASK, args=[i, 100], kwargs={"password": f"p{i}"},
                   fingerprint="b" * 40, status="resolved")
        for i in range(2_000)
    ])
    DeadLetterEvent.objects.bulk_create([
        DeadLetterEvent(letter=letter, action="resolved", actor="bob") for letter in letters
    ])
    # When they are exported as JSON lines
    with CaptureQueriesContext(connection) as queries:
        out = Recorder(queries)
        written = export.write_jsonl(DeadLetter.objects.order_by("pk"), out)
    # Then all of them are written, in order, masked, with their events
    assert written == 2_000
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["task_id"] for r in records] == [f"bulk-{i}" for i in range(2_000)]
    assert all(r["kwargs"] == {"password": MASK} and len(r["events"]) == 1 for r in records)
    # And the letters were read in chunks, writing as they came: a few queries in all
    # (not one per letter), and the first line written before the last chunk was read
    assert len(queries.captured_queries) <= 2 * (2_000 // export.CHUNK) + 2
    assert len(queries.captured_queries) >= 2_000 // export.CHUNK  # one events query a chunk
    assert out.at_write[0] <= 2  # the letters query and the first chunk's events
    assert out.at_write[-1] == len(queries.captured_queries)
    # The same for CSV
    with CaptureQueriesContext(connection) as queries:
        out = Recorder(queries)
        assert export.write_csv(DeadLetter.objects.order_by("pk"), out) == 2_000
    assert len(list(csv.reader(io.StringIO(out.getvalue(), newline="")))) == 2_001
    assert len(queries.captured_queries) <= 2 * (2_000 // export.CHUNK) + 2


LAZY_CARD_TASK = '''
import time

from celery import shared_task

time.sleep(0.5)  # a task module that takes a while to import


@shared_task(name="{pkg}.charge_card")
def charge_card(order_id, card_token):
    return None
'''


def test_two_exports_starting_at_once_in_a_fresh_process_both_mask_positional_secrets(
        tmp_path, monkeypatch):
    # Given an app whose task modules are not imported yet (a process just started)
    pkg = f"lazy_cards_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "tasks.py").write_text(LAZY_CARD_TASK.format(pkg=pkg))
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = Celery("lazy-cards", set_as_current=False)
    lazy.autodiscover_tasks([pkg])
    start = threading.Barrier(2)
    shown = []

    def look():
        start.wait(timeout=10)
        shown.append(redaction.masked_payload(f"{pkg}.charge_card", [7, "tok_live_4242"], {},
                                              app=lazy))

    # When two of them need the task's signature at the same moment
    threads = [threading.Thread(target=look) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Then both mask the card token by its parameter name
    assert shown == [([7, MASK], {}), ([7, MASK], {})]
