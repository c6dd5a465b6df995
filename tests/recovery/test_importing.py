"""``recovery.store.importing``: what an export record may set, and the upsert by task id,
on real PostgreSQL."""

from __future__ import annotations

import io
import json

import psycopg
import pytest
from django.db import DataError

from recovery.core.redaction import MASK
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.store import export, importing
from recovery.workflows import sagas

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"


def record(**changes) -> dict:
    values = {"id": 1, "task_id": "r-1", "task_name": TASK, "args": [1, 100], "kwargs": {},
              "headers": {}, "raw_body": "", "content_type": "", "status": "parked",
              "kind": "dependency", "permanent": True, "reason": "gave up",
              "exception_type": "recovery.core.errors.DependencyError",
              "exception_message": "declined", "traceback": "Traceback ...", "attempts": 2,
              "replay_count": 1, "history": [{"attempt": 1, "kind": "dependency"}],
              "queue": "payments", "worker": "w1@host", "fingerprint": "b" * 40,
              "first_failed_at": "2026-11-28T10:00:00+00:00",
              "last_failed_at": "2026-11-28T10:05:00+00:00",
              "created_at": "2020-01-01T00:00:00+00:00", "updated_at": "2020-01-01T00:00:00+00:00",
              "events": []}
    values.update(changes)
    return values


def run(*records: dict, source: str = "letters.jsonl") -> importing.Report:
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    return importing.import_jsonl(io.BytesIO(text), actor="cli:ops", source=source)


def test_a_record_sets_the_letters_failure_and_state_and_nothing_of_the_database():
    other = DeadLetter.objects.create(task_id="other", task_name=TASK, fingerprint="a" * 40)
    report = run(record(id=other.pk))
    assert report.created == 1
    letter = DeadLetter.objects.get(task_id="r-1")
    assert letter.pk != other.pk  # the record's id is never used
    assert (letter.args, letter.status, letter.attempts, letter.replay_count, letter.queue) == (
        [1, 100], "parked", 2, 1, "payments")
    assert letter.created_at.year != 2020 and letter.updated_at.year != 2020
    assert DeadLetter.objects.get(pk=other.pk).task_id == "other"


def test_the_audit_trail_of_a_record_is_never_written_one_imported_event_is():
    forged = [{"at": "2026-11-28T11:00:00+00:00", "action": "resolved", "actor": "admin",
               "note": "approved", "outcome": "", "before": None, "after": None}] * 3
    run(record(events=forged))
    [event] = DeadLetterEvent.objects.all()
    assert (event.action, event.actor) == ("imported", "cli:ops")
    assert event.note == ("from letters.jsonl, line 1; its source's audit trail (3 events) "
                          "is not imported")
    assert event.outcome.startswith("created record:")


def test_a_replaying_letter_arrives_parked_no_replay_is_in_flight_here():
    run(record(status="replaying"))
    assert DeadLetter.objects.get().status == "parked"


def test_a_saga_steps_letter_keeps_its_sagas_secret_keys_but_names_no_run_here():
    saga = {"run": 41, "step": 2, "role": "step", "secret_keys": ["maiden_name"]}
    run(record(headers={"headers": {"recovery_saga": saga, "trace": "t"}}),
        record(task_id="r-2", headers={"recovery_saga": {"run": 7, "step": 0}}))
    first, second = DeadLetter.objects.order_by("task_id")
    assert first.headers == {"headers": {"recovery_saga": {"secret_keys": ["maiden_name"]},
                                         "trace": "t"}}
    assert second.headers == {"recovery_saga": None}
    assert sagas.saga_of_letter(first) is None and sagas.saga_of_letter(second) is None


def test_values_are_bounded_and_cleaned_as_a_parked_letters_are(settings):
    settings.RECOVERY = {**settings.RECOVERY, "MESSAGE_MAX_CHARS": 100}
    run(record(exception_message="x" * 500 + "\x00",
               history=[{"attempt": "3", "kind": {"forged": True}, "is_admin": True}],
               kwargs={"note": "a\x00b"}))
    letter = DeadLetter.objects.get()
    assert len(letter.exception_message) <= 100 and "chars cut" in letter.exception_message
    assert letter.history == [{"attempt": 3, "kind": '{"forged": true}'}]
    assert letter.kwargs == {"note": "a\\x00b"}


def test_secrets_the_payload_holds_are_scrubbed_from_its_text_as_at_parking():
    run(record(kwargs={"api_token": "at_live_9"}, exception_message="token at_live_9 refused"))
    letter = DeadLetter.objects.get()
    assert letter.kwargs == {"api_token": "at_live_9"}  # a revealed export restores the payload
    assert letter.exception_message == f"token {MASK} refused"


def test_the_upsert_creates_leaves_unchanged_updates_and_keeps():
    run(record(), record(task_id="r-2"))
    DeadLetter.objects.create(task_id="local", task_name=TASK, fingerprint="a" * 40)
    report = run(record(), record(task_id="r-2", status="resolved"), record(task_id="local"))
    assert (report.created, report.unchanged, report.updated) == (0, 1, 1)
    assert report.kept == ["line 3: local: a letter of this database, which an import never "
                           "overwrites"]
    assert DeadLetter.objects.get(task_id="r-2").status == "resolved"
    assert [e.outcome.split()[0] for e in DeadLetterEvent.objects.filter(
        letter__task_id="r-2").order_by("pk")] == ["created", "updated"]
    # the same newer record again changes nothing
    report = run(record(task_id="r-2", status="resolved"))
    assert (report.unchanged, report.updated) == (1, 0)


def test_a_letter_parked_here_again_after_its_import_is_kept():
    run(record())
    DeadLetter.objects.filter(task_id="r-1").update(
        history=[{"attempt": 1}, {"attempt": 2, "replay": 2}], attempts=3)
    report = run(record(status="resolved"))
    assert report.kept == ["line 1: r-1: changed here since it was imported; an import never "
                           "overwrites that"]
    assert DeadLetter.objects.get().status == "parked"


def test_a_file_export_imported_into_an_empty_table_gives_back_the_masked_letters():
    letter = DeadLetter.objects.create(
        task_id="c-1", task_name=TASK, args=[5, 700], kwargs={"password": "pw-1"},
        fingerprint="d" * 40, status="discarded", attempts=4, queue="q")
    out = io.StringIO()
    export.write_jsonl(DeadLetter.objects.all(), out)
    original = export.letter_record(letter, events=False)
    DeadLetter.objects.all().delete()
    report = importing.import_jsonl(io.BytesIO(out.getvalue().encode()), actor="cli", source="f")
    assert report.created == 1
    imported = DeadLetter.objects.get()
    assert imported.kwargs == {"password": MASK}
    assert {name: getattr(imported, name) for name in importing.IMPORTED} == {
        name: original[name] for name in importing.IMPORTED}


def test_a_json_lines_file_skips_blank_and_malformed_lines_naming_each():
    lines = [json.dumps(record()), "", "not json", json.dumps(record(task_id="r-2")),
             json.dumps({"task_id": "x"}) + " " * 50, json.dumps(record(task_id="r-3"))]
    report = importing.import_jsonl(io.BytesIO(("\n".join(lines)).encode()), actor="cli",
                                    source="f", batch_size=2, max_bytes=2000)
    assert report.created == 3
    assert report.skipped == [
        "line 3: not JSON (Expecting value: line 1 column 1 (char 0))",
        "line 5: missing fields: task_name, args, kwargs, headers, raw_body, content_type, "
        "status, kind, permanent, reason, exception_type, exception_message, traceback, "
        "attempts, replay_count, history, queue, worker, fingerprint, first_failed_at, "
        "last_failed_at"]


def test_a_line_longer_than_a_record_may_be_is_skipped_without_reading_it_whole():
    text = (json.dumps(record()) + "\n" + "x" * 10_000 + "\n" + json.dumps(record(task_id="r-2"))
            + "\n").encode()
    report = importing.import_jsonl(io.BytesIO(text), actor="cli", source="f", max_bytes=1000)
    assert report.created == 2
    assert report.skipped == ["line 2: longer than the 1000 bytes a record may have"]


def test_a_record_the_database_refuses_is_skipped_alone(monkeypatch):
    real = importing._write_one

    def refuse_r2(incoming, **kwargs):
        if incoming.task_id == "r-2":
            raise DataError("value too long") from psycopg.errors.StringDataRightTruncation()
        return real(incoming, **kwargs)

    monkeypatch.setattr(importing, "_write_one", refuse_r2)
    report = run(record(), record(task_id="r-2"), record(task_id="r-3"))
    assert report.created == 2 and not report.ok
    assert report.skipped == ["line 2: the database refused it (value too long)"]
    assert sorted(DeadLetter.objects.values_list("task_id", flat=True)) == ["r-1", "r-3"]
