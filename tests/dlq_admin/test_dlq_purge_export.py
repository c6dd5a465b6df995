"""``manage.py dlq compensate``, ``purge`` and ``export`` against real PostgreSQL and Redis."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from recovery.models import DeadLetter, DeadLetterEvent, DeliveryCount
from recovery.core.redaction import MASK

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"  # compensate="tasks.tasks.cancel_order"
COMPENSATION = "tasks.tasks.cancel_order"
NO_COMPENSATION = "tasks.tasks.fetch_exchange_rate"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make(n: int, status: str = "parked", closed_days_ago: float = 0, **overrides) -> DeadLetter:
    values = dict(task_id=f"t-{n}", task_name=TASK, args=[n, 100], kwargs={}, status=status,
                  fingerprint="c" * 40, kind="dependency", exception_type="DependencyError",
                  exception_message=f"declined {n}")
    values.update(overrides)
    letter = DeadLetter.objects.create(**values)
    if closed_days_ago:
        DeadLetter.objects.filter(pk=letter.pk).update(
            updated_at=timezone.now() - timedelta(days=closed_days_ago))
    return letter


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("dlq", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def published(broker, queue: str = "celery") -> list[dict]:
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def statuses() -> dict[str, str]:
    return dict(DeadLetter.objects.values_list("task_id", "status"))


# -- compensate ---------------------------------------------------------------------------


def test_compensate_by_ids_publishes_the_compensations_and_audits_as_the_cli_user(broker):
    made = [make(n) for n in range(3)]
    out, _ = run("compensate", "--ids", f"{made[0].pk},{made[2].pk}", "--yes",
                 "--note", "orders void")
    assert "Compensated 2 letters; 0 failed." in out
    assert sorted((m["headers"]["task"], m["headers"]["id"]) for m in published(broker)) == [
        (COMPENSATION, "t-0.compensation"), (COMPENSATION, "t-2.compensation")]
    assert statuses() == {"t-0": "compensated", "t-1": "parked", "t-2": "compensated"}
    events = DeadLetterEvent.objects.filter(action="compensated", note="orders void")
    assert events.count() == 2 and all(e.actor.startswith("cli") for e in events)


def test_compensate_dry_run_changes_nothing(broker):
    for n in range(3):
        make(n)
    out, _ = run("compensate", "--dry-run")
    assert "Would compensate 3 parked letters" in out
    assert set(statuses().values()) == {"parked"}
    assert published(broker) == [] and not DeadLetterEvent.objects.exists()


def test_compensate_with_nothing_parked_says_so(broker):
    make(1, status="resolved")
    out, _ = run("compensate", "--yes")
    assert "No parked letters match; nothing to compensate." in out
    assert published(broker) == []


def test_compensate_that_partly_fails_exits_non_zero_and_keeps_the_failed_letters(broker):
    make(1)
    make(2, task_name=NO_COMPENSATION, args=["EUR"])
    with pytest.raises(CommandError, match=r"1 letter\(s\) could not be compensated") as caught:
        run("compensate", "--yes", "--batch-size", "1")
    assert caught.value.returncode == 1
    assert statuses() == {"t-1": "compensated", "t-2": "parked"}
    assert [m["headers"]["id"] for m in published(broker)] == ["t-1.compensation"]


def test_compensate_asks_first_and_an_answer_other_than_yes_aborts(broker, monkeypatch):
    make(1)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(CommandError, match="aborted; nothing changed"):
        run("compensate")
    assert statuses() == {"t-1": "parked"} and published(broker) == []


# -- purge --------------------------------------------------------------------------------


@pytest.fixture
def aged():
    """Letters of every status at ages around their retention, each with an audit event;
    a stale and a fresh delivery count."""
    made = [
        make(1, "resolved", 31), make(2, "resolved", 29), make(3, "discarded", 31),
        make(4, "compensated", 91), make(5, "compensated", 60), make(6, "parked", 400),
        make(7, "parked", 3), make(8, "replaying", 400), make(9, "resolved", 10),
    ]
    for letter in made:
        DeadLetterEvent.objects.create(letter=letter, action="resolved", actor="bob")
    DeliveryCount.objects.create(task_id="stale", deliveries=2)
    DeliveryCount.objects.create(task_id="fresh", deliveries=1)
    DeliveryCount.objects.filter(task_id="stale").update(
        updated_at=timezone.now() - timedelta(days=8))
    return made


def remaining() -> set[str]:
    return set(DeadLetter.objects.values_list("task_id", flat=True))


ALL = {f"t-{n}" for n in range(1, 10)}


def test_purge_by_default_deletes_letters_past_their_retention_with_their_events(aged):
    out, _ = run("purge", "--yes")
    assert "Purging resolved letters closed before" in out
    assert "Purged 3 letters." in out
    assert remaining() == ALL - {"t-1", "t-3", "t-4"}
    assert DeadLetterEvent.objects.count() == 6
    assert set(DeadLetterEvent.objects.values_list("letter__task_id", flat=True)) == remaining()
    assert set(DeliveryCount.objects.values_list("task_id", flat=True)) == {"fresh"}


def test_purge_older_than_overrides_the_retention_of_closed_letters(aged):
    out, _ = run("purge", "--older-than", "7d", "--yes", "--batch-size", "2")
    assert "Purged 6 letters." in out
    assert remaining() == {"t-6", "t-7", "t-8"}  # parked and replaying: never without asking


def test_purge_filters_narrow_what_is_deleted(aged):
    out, _ = run("purge", "--status", "compensated", "--older-than", "30d", "--yes")
    assert "Purged 2 letters." in out
    assert remaining() == ALL - {"t-4", "t-5"}
    out, _ = run("purge", "--ids", str(aged[0].pk), "--older-than", "1d", "--yes")
    assert "Purged 1 letter." in out
    assert "t-1" not in remaining() and "t-9" in remaining()


def test_purge_dry_run_counts_and_deletes_nothing(aged):
    out, _ = run("purge", "--dry-run")
    assert "Would delete 3 letters and their audit events." in out
    assert remaining() == ALL
    assert DeadLetterEvent.objects.count() == 9
    assert DeliveryCount.objects.count() == 2


def test_purge_asks_first_and_an_answer_other_than_yes_aborts(aged, monkeypatch):
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or "no")
    with pytest.raises(CommandError, match="aborted; nothing deleted"):
        run("purge")
    assert prompts == ["Delete 3 letters and their audit events for good? [y/N] "]
    assert remaining() == ALL


@pytest.mark.parametrize("args, error", [
    (("--status", "parked"), "refusing to purge parked letters"),
    (("--status", "parked", "--older-than", "1d"), "refusing to purge parked letters"),
    (("--status", "parked", "--include-parked"), "needs an explicit age"),
    (("--include-parked",), "needs an explicit age"),
    (("--status", "replaying"), "replaying letters are in flight"),
    (("--status", "replaying", "--include-parked", "--older-than", "1d"),
     "replaying letters are in flight"),
    (("--older-than", "last tuesday"), "cannot read 'last tuesday' as a time"),
])
def test_purge_refusals_exit_non_zero_and_delete_nothing(aged, args, error):
    with pytest.raises(CommandError, match=error) as caught:
        run("purge", *args, "--yes")
    assert caught.value.returncode == 1
    assert remaining() == ALL
    assert DeadLetterEvent.objects.count() == 9
    assert DeliveryCount.objects.count() == 2


def test_purge_of_parked_letters_needs_include_parked_and_an_age(aged):
    out, _ = run("purge", "--status", "parked", "--include-parked", "--older-than", "90d", "--yes")
    assert "Purged 1 letter." in out
    assert remaining() == ALL - {"t-6"}


def test_purge_with_nothing_to_delete_says_so_and_still_forgets_stale_delivery_counts(aged):
    # A nightly `dlq purge --yes` usually finds no letter old enough; delivery counts of
    # long-finished tasks must not pile up because of that.
    out, _ = run("purge", "--task", "billing.tasks.gone", "--dry-run")
    assert "No letters match; nothing to purge." in out
    assert DeliveryCount.objects.count() == 2  # a dry run forgets nothing
    out, _ = run("purge", "--task", "billing.tasks.gone", "--yes")
    assert "No letters match; nothing to purge." in out
    assert remaining() == ALL
    assert set(DeliveryCount.objects.values_list("task_id", flat=True)) == {"fresh"}


def test_purge_limit_deletes_at_most_that_many_oldest_ids_first(aged):
    out, _ = run("purge", "--older-than", "7d", "--limit", "2", "--yes")
    assert "Purged 2 letters." in out
    assert remaining() == ALL - {"t-1", "t-2"}


def test_purge_refused_in_a_real_process_exits_with_status_1(aged):
    db = connection.settings_dict
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "TEST_DATABASE_URL": f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:"
                                f"{db['PORT'] or 5432}/{db['NAME']}"}
    done = subprocess.run([sys.executable, "manage.py", "dlq", "purge", "--status", "parked",
                           "--yes"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "refusing to purge parked letters" in done.stderr
    assert remaining() == ALL


# -- export -------------------------------------------------------------------------------


@pytest.fixture
def secret_letters():
    row = DeadLetter.objects.create(
        task_id="row-1", task_name="tasks.tasks.import_customer_row",
        args=[{"id": 3, "email": "a@b.c", "password": "hunter2"}], kwargs={},
        headers={"headers": {"authorization": "Bearer sk_live_abc"}},
        fingerprint="e" * 40, exception_message="row 3, \"bad\"\nsecond line",
    )
    DeadLetterEvent.objects.create(
        letter=row, action="edited", actor="alice",
        before={"args": [{"id": 3, "password": "old_pw"}], "kwargs": {}},
        after={"args": [{"id": 3, "password": "hunter2"}], "kwargs": {}},
    )
    payment = make(1, status="resolved", kwargs={"api_token": "at_secret"})
    return row, payment


SECRETS = ("hunter2", "old_pw", "sk_live_abc", "at_secret")


def test_export_jsonl_to_stdout_masks_secrets(secret_letters):
    row, payment = secret_letters
    out, err = run("export")
    for secret in SECRETS:
        assert secret not in out
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["task_id"] for r in records] == ["row-1", "t-1"]  # in id order
    assert records[0]["args"] == [{"id": 3, "email": "a@b.c", "password": MASK}]
    assert records[0]["headers"] == {"headers": {"authorization": MASK}}
    assert records[0]["exception_message"] == "row 3, \"bad\"\nsecond line"
    [event] = records[0]["events"]
    assert event["before"] == {"args": [{"id": 3, "password": MASK}], "kwargs": {}}
    assert records[1]["kwargs"] == {"api_token": MASK}
    assert "Exported 2 letters (secrets masked)." in err


def test_export_reveal_writes_the_secrets(secret_letters):
    out, err = run("export", "--reveal")
    for secret in SECRETS:
        assert secret in out
    assert "Exported 2 letters (secrets revealed)." in err


def test_export_jsonl_to_a_file_with_filters_and_without_events(secret_letters, tmp_path):
    target = tmp_path / "letters.jsonl"
    out, err = run("export", "--output", str(target), "--status", "parked", "--no-events")
    assert out == ""
    [record] = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert record["task_id"] == "row-1" and "events" not in record
    assert "hunter2" not in target.read_text(encoding="utf-8")
    assert "Exported 1 letter (secrets masked)." in err


def test_export_csv_to_a_file_parses_back(secret_letters, tmp_path):
    row, payment = secret_letters
    target = tmp_path / "letters.csv"
    run("export", "--format", "csv", "-o", str(target))
    text = target.read_text(encoding="utf-8")
    for secret in SECRETS:
        assert secret not in text
    with open(target, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [str(row.pk), str(payment.pk)]
    assert rows[0]["exception_message"] == "row 3, \"bad\"\nsecond line"
    assert json.loads(rows[0]["args"]) == [{"id": 3, "email": "a@b.c", "password": MASK}]
    assert json.loads(rows[1]["kwargs"]) == {"api_token": MASK}
    assert rows[1]["status"] == "resolved"


def test_export_jsonl_with_a_limit_keeps_the_audit_trail(secret_letters):
    out, err = run("export", "--limit", "1")
    [record] = [json.loads(line) for line in out.splitlines()]
    assert record["task_id"] == "row-1" and [e["action"] for e in record["events"]] == ["edited"]
    assert "Exported 1 letter (secrets masked)." in err


def test_export_csv_to_stdout_with_reveal_and_a_limit(secret_letters):
    out, err = run("export", "--format", "csv", "--reveal", "--limit", "1")
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert len(rows) == 1
    assert json.loads(rows[0]["args"])[0]["password"] == "hunter2"
    assert "Exported 1 letter (secrets revealed)." in err


def test_show_is_the_export_record_with_its_audit_trail(secret_letters):
    row, _ = secret_letters
    out, _ = run("show", str(row.pk))
    shown = json.loads(out)
    assert shown["task_id"] == "row-1" and shown["args"][0]["password"] == MASK
    assert [e["action"] for e in shown["events"]] == ["edited"]
    assert shown["events"][0]["after"]["args"][0]["password"] == MASK
    revealed = json.loads(run("show", str(row.pk), "--reveal")[0])
    # the reveal is audited before the record is read, so it lists itself first
    assert [(e["action"], e["note"]) for e in revealed["events"]] == [
        ("revealed", "dlq show --reveal"), ("edited", revealed["events"][1]["note"])]
    assert revealed["events"][1]["before"]["args"][0]["password"] == "old_pw"
