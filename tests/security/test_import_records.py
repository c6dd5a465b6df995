"""Attacks through ``manage.py dlq import``: an export file or a Kafka topic is input that
whoever can write it chose. An import must not unmask a secret, overwrite a letter of this
database, write an audit trail, or be stopped by one bad record."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.urls import reverse

from recovery.core.redaction import MASK
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.store import importing, kafka
from tests.kafka_fakes import FakeConsumer, FakeMessage

from .staff_users import staff  # noqa: F401 - the fixture

pytestmark = pytest.mark.django_db(transaction=True)

ROW_TASK = "tasks.tasks.import_customer_row"


def record(**changes) -> dict:
    values = {"task_id": "i-1", "task_name": ROW_TASK, "args": [{"id": 3, "password": MASK}],
              "kwargs": {}, "headers": {}, "raw_body": "", "content_type": "",
              "status": "parked", "kind": "data_integrity", "permanent": True, "reason": "",
              "exception_type": "ValueError", "exception_message": "bad row",
              "traceback": "", "attempts": 1, "replay_count": 0, "history": [], "queue": "",
              "worker": "", "fingerprint": "9" * 40,
              "first_failed_at": "2026-11-28T10:00:00+00:00",
              "last_failed_at": "2026-11-28T10:00:00+00:00"}
    values.update(changes)
    return values


def import_lines(*lines: str) -> str:
    err = io.StringIO()
    path_text = "\n".join(lines) + "\n"
    report = importing.import_jsonl(io.BytesIO(path_text.encode()), actor="cli:mallory",
                                    source="evil.jsonl")
    for line in report.skipped + report.kept:
        err.write(line + "\n")
    return err.getvalue()


def test_a_masked_value_stays_masked_even_to_someone_who_may_reveal():
    import_lines(json.dumps(record()))
    out = io.StringIO()
    letter = DeadLetter.objects.get()
    call_command("dlq", "show", str(letter.pk), "--reveal", stdout=out)
    shown = json.loads(out.getvalue())
    assert shown["args"] == [{"id": 3, "password": MASK}]  # nothing behind the mask to reveal


def test_a_record_cannot_unmask_a_letter_of_this_database_by_renaming_its_task():
    # Given a letter parked here whose secret is masked by its task's parameter names
    DeadLetter.objects.create(task_id="i-1", task_name="billing.tasks.charge_card",
                              args=[7, "tok_live_4242"], fingerprint="9" * 40)
    # When a record with that task id names another task and keeps the mask
    problems = import_lines(json.dumps(record(task_name=ROW_TASK, args=[7, MASK])))
    # Then the letter is kept as it is: not renamed, not merged, not overwritten
    assert "i-1: a letter of this database, which an import never overwrites" in problems
    letter = DeadLetter.objects.get()
    assert (letter.task_name, letter.args) == ("billing.tasks.charge_card", [7, "tok_live_4242"])


def test_secrets_of_a_revealed_export_are_masked_on_every_surface_after_import(staff):
    # A revealed export file imported elsewhere holds real secrets: they are stored (a
    # replay needs them) and shown masked like any letter's.
    import_lines(json.dumps(record(args=[{"id": 3, "password": "hunter2"}],
                                   exception_message="row 3 password hunter2 rejected")))
    letter = DeadLetter.objects.get()
    page = staff("view_deadletter").get(
        reverse("admin:recovery_deadletter_change", args=[letter.pk])).content.decode()
    assert "hunter2" not in page and MASK in page
    assert letter.exception_message == f"row 3 password {MASK} rejected"  # scrubbed at import


def test_a_record_cannot_write_an_audit_trail_or_choose_its_row():
    victim = DeadLetter.objects.create(task_id="victim", task_name=ROW_TASK, fingerprint="8" * 40)
    forged = [{"at": "2026-01-01T00:00:00+00:00", "action": "resolved", "actor": "ceo",
               "note": "approved, pay out", "outcome": "", "before": None, "after": None}]
    import_lines(json.dumps(record(id=victim.pk, events=forged, created_at="2000-01-01")))
    assert not DeadLetterEvent.objects.filter(actor="ceo").exists()
    assert list(DeadLetterEvent.objects.values_list("action", "actor")) == [
        ("imported", "cli:mallory")]
    assert DeadLetter.objects.get(pk=victim.pk).task_id == "victim"


def test_fields_no_export_writes_are_refused_not_ignored():
    problems = import_lines(json.dumps(record(is_staff=True, password_hash="x")))
    assert "line 1: fields no export writes: is_staff, password_hash" in problems
    assert not DeadLetter.objects.exists()


def test_hostile_records_are_skipped_and_the_rest_imported():
    deep = "[" * 100_000 + "]" * 100_000
    problems = import_lines(
        json.dumps(record(task_id="ok-1")),
        '{"task_id": ' + deep + "}",
        json.dumps(record(task_id="x" * 300)),
        json.dumps(record(task_id="nul\u0000id")),
        json.dumps(record(task_id="ok-2", attempts=-1)),
        json.dumps(record(task_id="ok-3", permanent="yes")),
        json.dumps(record(task_id="ok-4")),
    )
    assert sorted(DeadLetter.objects.values_list("task_id", flat=True)) == ["ok-1", "ok-4"]
    assert "line 2: not JSON (maximum recursion depth exceeded" in problems
    assert "line 3: task_id is empty, too long or not storable as it is" in problems
    assert "line 4: task_id is empty, too long or not storable as it is" in problems
    assert "line 5: fields of the wrong type: attempts" in problems
    assert "line 6: fields of the wrong type: permanent" in problems


def test_a_kafka_record_whose_key_is_not_its_task_id_is_refused():
    # A compacted topic keeps the latest record per key: a record filed under another
    # letter's key could shadow it there, so key and task id must agree.
    value = json.dumps(record(task_id="i-2")).encode()
    consumer = FakeConsumer([FakeMessage(key_=b"i-1", value_=value)], partitions=(0,))
    result = kafka.import_letters(kafka.parse_url("kafka://k:9092/t"), actor="cli",
                                  consumer=consumer, idle_seconds=0.2)
    assert result.skipped == ["partition 0 offset 0: its key (b'i-1') is not its task id ('i-2')"]
    assert not DeadLetter.objects.exists()
