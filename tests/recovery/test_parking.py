"""recovery.store.parking against the real PostgreSQL test database: one letter per task id,
bounded and NUL-safe text, cumulative attempts across replays, and the spool drain.

Parking a new letter outside a transaction takes the single-statement PostgreSQL path
(recovery.store.pg_fastpath); inside a transaction, or on a conflict, it takes the general
path. The ``park_via`` fixture runs each test through both.
"""

from __future__ import annotations

import base64
import time
from datetime import datetime, timezone

import pytest
from celery.app.task import Context
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django_celery_results.models import TaskResult
from hypothesis import given, settings
from hypothesis import strategies as st

from config.celery import app as celery_app
from recovery.core.fingerprint import fingerprint
from recovery.models import DeadLetter
from recovery.store.parking import ParkRecord, drain_spool, park, spool

FAILED_AT = "2026-03-01T12:00:00+00:00"
LATER = "2026-03-02T08:30:00+00:00"

db = pytest.mark.django_db(transaction=True)


def attempts(count, *, replay=0, message="503 Server Error for order 1234", first=1):
    """History entries shaped the way RecoveryTask writes them."""
    return [
        {
            "at": f"2026-03-01T11:5{n}:00+00:00",
            "attempt": n,
            "replay": replay,
            "exception_type": "requests.exceptions.HTTPError",
            "exception_message": message,
            "kind": "dependency",
            "delay_seconds": None if n == first + count - 1 else 2.0 * n,
        }
        for n in range(first, first + count)
    ]


def make_record(**overrides) -> ParkRecord:
    data = dict(
        task_id="7d4c0b5e-charge-1234",
        task_name="tasks.charge_order",
        kind="dependency",
        reason="gave up after 3 attempts (requests: HTTP 503)",
        exception_type="requests.exceptions.HTTPError",
        exception_message="503 Server Error for order 1234",
        traceback="Traceback (most recent call last):\n  File \"tasks.py\", line 9\n",
        args=[1234],
        kwargs={"amount": "9.99", "currency": "EUR"},
        headers={"chain": [{"task": "tasks.ship_order"}], "priority": 3},
        raw_body="",
        content_type="application/json",
        permanent=False,
        history=attempts(3),
        replay=0,
        queue="payments",
        worker="celery@worker-1",
        failed_at=FAILED_AT,
    )
    data.update(overrides)
    return ParkRecord(**data)


@pytest.fixture(params=["single-statement", "in-transaction"])
def park_via(request):
    def call(record, **kwargs):
        if request.param == "in-transaction":
            with transaction.atomic():
                return park(record, **kwargs)
        return park(record, **kwargs)

    return call


@pytest.fixture
def recovery_settings(settings):
    def apply(**values):
        settings.RECOVERY = {**settings.RECOVERY, **values}

    return apply


# -- a first park ---------------------------------------------------------------------------------


@db
def test_park_creates_one_letter_holding_every_field(park_via):
    record = make_record()
    outcome = park_via(record)

    letter = DeadLetter.objects.get()
    assert outcome.letter_id == letter.pk
    assert outcome.spooled is False
    assert outcome.result_stored is False
    assert letter.task_id == "7d4c0b5e-charge-1234"
    assert letter.task_name == "tasks.charge_order"
    assert letter.status == DeadLetter.Status.PARKED
    assert letter.kind == "dependency"
    assert letter.permanent is False
    assert letter.reason == "gave up after 3 attempts (requests: HTTP 503)"
    assert letter.exception_type == "requests.exceptions.HTTPError"
    assert letter.exception_message == "503 Server Error for order 1234"
    assert letter.traceback == record.traceback
    assert letter.args == [1234]
    assert letter.kwargs == {"amount": "9.99", "currency": "EUR"}
    assert letter.headers == {"chain": [{"task": "tasks.ship_order"}], "priority": 3}
    assert letter.content_type == "application/json"
    assert letter.queue == "payments"
    assert letter.worker == "celery@worker-1"
    assert letter.history == attempts(3)
    assert letter.attempts == 3 == len(record.history)
    assert letter.replay_count == 0
    assert letter.fingerprint == fingerprint(
        "tasks.charge_order", "requests.exceptions.HTTPError", "503 Server Error for order 1234"
    )
    assert len(letter.fingerprint) == 40
    expected_time = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert letter.first_failed_at == expected_time
    assert letter.last_failed_at == expected_time
    assert len(spool()) == 0


@db
def test_a_permanent_poison_letter_keeps_its_raw_body(park_via):
    park_via(make_record(kind="poison", permanent=True, raw_body='{"this is": not json',
                         args=[], kwargs={}, history=attempts(1)))
    letter = DeadLetter.objects.get()
    assert (letter.kind, letter.permanent) == ("poison", True)
    assert letter.raw_body == '{"this is": not json'
    assert letter.attempts == 1


@db
def test_a_poison_letter_parked_again_by_its_replay_keeps_the_original_body(park_via):
    # The body may be the only copy of the message (one refused as too large).
    park_via(make_record(kind="poison", permanent=True, raw_body="[[1], {}, {}]", args=[],
                         kwargs={}, history=attempts(1)))
    park_via(make_record(kind="dependency", permanent=True, raw_body="", replay=1,
                         history=[{**attempts(1)[0], "replay": 1}]))
    letter = DeadLetter.objects.get()
    assert letter.kind == "dependency" and letter.raw_body == "[[1], {}, {}]"


@db
def test_a_letter_without_history_counts_one_attempt(park_via):
    park_via(make_record(history=[]))
    assert DeadLetter.objects.get().attempts == 1


@db
def test_a_failed_at_without_a_zone_is_utc(park_via):
    park_via(make_record(failed_at="2026-03-01T12:00:00"))
    assert DeadLetter.objects.get().last_failed_at == datetime(2026, 3, 1, 12, tzinfo=timezone.utc)


@db
def test_a_long_reason_and_exception_type_fit_their_columns(park_via):
    park_via(make_record(reason="r" * 1000, exception_type="x." * 400))
    letter = DeadLetter.objects.get()
    assert len(letter.reason) <= 255
    assert len(letter.exception_type) <= 255


def celery_request(record):
    """The Celery request a worker would pass along (a real celery Context)."""
    return Context(id=record.task_id, task=record.task_name, args=record.args,
                   kwargs=record.kwargs, hostname=record.worker)


@db
def test_park_stores_the_failure_result_with_the_letter(park_via):
    backend = celery_app.backend
    exc = ValueError("card declined for order 1234")
    record = make_record(result={"result": backend.prepare_exception(exc),
                                 "traceback": "Traceback: card declined"})
    outcome = park_via(record, backend=backend, request=celery_request(record))
    assert outcome.result_stored is True
    assert outcome.spooled is False
    assert DeadLetter.objects.count() == 1
    result = TaskResult.objects.get(task_id=record.task_id)
    assert result.status == "FAILURE"
    assert "card declined for order 1234" in result.result
    assert result.traceback == "Traceback: card declined"
    assert result.task_name == "tasks.charge_order"


# -- bounded, NUL-safe text -----------------------------------------------------------------------


@db
def test_the_message_is_bounded_by_the_setting(park_via, recovery_settings):
    recovery_settings(MESSAGE_MAX_CHARS=200, TRACEBACK_MAX_CHARS=300)
    message = "order 1234 " + "x" * 5000
    park_via(make_record(exception_message=message, traceback="t" * 10_000))
    letter = DeadLetter.objects.get()
    assert len(letter.exception_message) <= 200
    assert letter.exception_message.startswith("order 1234 xxx")
    assert letter.exception_message.endswith("chars cut]")
    assert len(letter.traceback) <= 300
    assert letter.traceback.endswith("chars cut]")


@db
def test_a_message_within_the_bound_is_kept_whole(park_via, recovery_settings):
    recovery_settings(MESSAGE_MAX_CHARS=50)
    park_via(make_record(exception_message="m" * 50))
    assert DeadLetter.objects.get().exception_message == "m" * 50


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(min_value=1, max_value=400), message=st.text(max_size=800))
def test_any_message_is_cut_to_the_configured_bound(limit, message):
    with override_settings(RECOVERY={"MESSAGE_MAX_CHARS": limit, "TRACEBACK_MAX_CHARS": limit}):
        record = make_record(exception_message=message, traceback=message)
    assert len(record.exception_message) <= limit
    assert len(record.traceback) <= limit
    assert "\x00" not in record.exception_message
    if len(message) <= limit and "\x00" not in message:
        assert record.exception_message == message


@db
def test_nul_characters_do_not_break_postgresql(park_via):
    nul_message = "bad byte \x00 in order 1234"
    record = make_record(
        exception_message=nul_message,
        traceback="Traceback\x00(most recent call last)",
        reason="gave up\x00",
        exception_type="tasks.errors.Bad\x00Error",
        history=attempts(2, message=nul_message),
        args=["abc\x00def", {"note\x00": "x\x00"}],
        kwargs={"memo": "\x00"},
        headers={"custom": "h\x00"},
        raw_body='["abc\x00def"]',
    )
    outcome = park_via(record)

    assert outcome.spooled is False
    assert len(spool()) == 0
    letter = DeadLetter.objects.get()
    assert letter.exception_message == "bad byte \\x00 in order 1234"
    assert letter.traceback == "Traceback\\x00(most recent call last)"
    assert "\x00" not in letter.reason + letter.exception_type
    assert letter.raw_body == "base64:" + base64.b64encode(b'["abc\x00def"]').decode()
    assert [entry["exception_message"] for entry in letter.history] == \
        ["bad byte \\x00 in order 1234"] * 2
    assert "\x00" not in repr((letter.args, letter.kwargs, letter.headers))
    assert letter.attempts == 2


@db
def test_nul_characters_do_not_break_the_stored_failure_result(park_via):
    backend = celery_app.backend
    exc = ValueError("bad byte \x00 in order 1234")
    record = make_record(
        exception_message=str(exc), history=attempts(1, message=str(exc)),
        result={"result": backend.prepare_exception(exc),
                "traceback": "Traceback\nValueError: bad byte \x00 in order 1234"},
    )
    outcome = park_via(record, backend=backend, request=celery_request(record))
    assert outcome.spooled is False
    assert outcome.result_stored is True
    result = TaskResult.objects.get(task_id=record.task_id)
    assert result.status == "FAILURE"
    assert result.traceback == "Traceback\nValueError: bad byte \\x00 in order 1234"


@db
def test_a_nul_in_a_spooled_letter_does_not_block_the_spool():
    nul_message = "bad byte \x00"
    spool().put(make_record(task_id="nul", exception_message=nul_message,
                            history=attempts(1, message=nul_message)).to_dict())
    spool().put(make_record(task_id="after").to_dict())
    assert drain_spool() == 2
    assert set(DeadLetter.objects.values_list("task_id", flat=True)) == {"nul", "after"}
    assert len(spool()) == 0


# -- parking the same task id again ---------------------------------------------------------------


@db
def test_parking_the_same_task_twice_keeps_one_row_and_its_attempts(park_via):
    first = park_via(make_record())
    second = park_via(make_record())
    assert DeadLetter.objects.count() == 1
    assert first.letter_id == second.letter_id
    letter = DeadLetter.objects.get()
    assert letter.attempts == 3
    assert letter.history == attempts(3)


@db
def test_a_replay_that_fails_again_appends_its_attempts(park_via):
    park_via(make_record())
    replay_history = attempts(2, replay=1, message="timeout charging order 1234")
    park_via(make_record(
        replay=1, history=replay_history, kind="timeout",
        exception_type="TimeoutError", exception_message="timeout charging order 1234",
        reason="gave up after 2 attempts (timeout)", failed_at=LATER,
    ))

    assert DeadLetter.objects.count() == 1
    letter = DeadLetter.objects.get()
    assert letter.attempts == 5
    assert letter.history == attempts(3) + replay_history
    # The letter describes the latest failure, and remembers when the first one happened.
    assert letter.kind == "timeout"
    assert letter.exception_type == "TimeoutError"
    assert letter.exception_message == "timeout charging order 1234"
    assert letter.fingerprint == fingerprint("tasks.charge_order", "TimeoutError",
                                             "timeout charging order 1234")
    assert letter.first_failed_at == datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    assert letter.last_failed_at == datetime(2026, 3, 2, 8, 30, tzinfo=timezone.utc)


@db
def test_a_redelivered_replay_does_not_count_its_attempts_twice(park_via):
    park_via(make_record())
    park_via(make_record(replay=1, history=attempts(2, replay=1)))
    park_via(make_record(replay=1, history=attempts(3, replay=1)))
    letter = DeadLetter.objects.get()
    assert letter.attempts == 6
    assert letter.history == attempts(3) + attempts(3, replay=1)


@db
def test_successive_replays_accumulate(park_via):
    park_via(make_record())
    park_via(make_record(replay=1, history=attempts(2, replay=1)))
    park_via(make_record(replay=2, history=attempts(4, replay=2)))
    assert DeadLetter.objects.get().attempts == 3 + 2 + 4


@db
def test_a_resolved_letter_that_fails_again_is_parked_again(park_via):
    park_via(make_record())
    DeadLetter.objects.update(status=DeadLetter.Status.RESOLVED)
    park_via(make_record())
    letter = DeadLetter.objects.get()
    assert letter.status == DeadLetter.Status.PARKED
    assert letter.attempts == 3


@db
def test_different_task_ids_get_different_letters(park_via):
    park_via(make_record(task_id="a"))
    park_via(make_record(task_id="b"))
    assert sorted(DeadLetter.objects.values_list("task_id", flat=True)) == ["a", "b"]


# -- the spool ------------------------------------------------------------------------------------


@db
def test_drain_spool_writes_spooled_letters_and_empties_the_spool():
    record = make_record()
    spool().put(record.to_dict())
    spool().put(make_record(task_id="second", history=attempts(1)).to_dict())
    assert DeadLetter.objects.count() == 0
    assert len(spool()) == 2

    assert drain_spool() == 2

    assert len(spool()) == 0
    letter = DeadLetter.objects.get(task_id=record.task_id)
    assert letter.task_name == record.task_name
    assert letter.exception_message == record.exception_message
    assert letter.history == record.history
    assert letter.attempts == 3
    assert letter.last_failed_at == datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    assert DeadLetter.objects.get(task_id="second").attempts == 1


@db
def test_drain_spool_with_nothing_spooled_does_nothing():
    assert drain_spool() == 0
    assert DeadLetter.objects.count() == 0


@db
def test_drain_spool_merges_into_a_letter_already_parked(park_via):
    park_via(make_record())
    spool().put(make_record().to_dict())
    assert drain_spool() == 1
    assert DeadLetter.objects.count() == 1
    assert DeadLetter.objects.get().attempts == 3


@db
def test_drain_spool_respects_its_limit():
    for n in range(3):
        spool().put(make_record(task_id=f"t{n}").to_dict())
    assert drain_spool(limit=2) == 2
    assert len(spool()) == 1
    assert sorted(DeadLetter.objects.values_list("task_id", flat=True)) == ["t0", "t1"]


def test_a_spooled_record_round_trips_through_json():
    record = make_record()
    assert ParkRecord.from_dict(record.to_dict()) == record
    # Keys a newer version might add are ignored by an older drain.
    assert ParkRecord.from_dict({**record.to_dict(), "added_later": 1}) == record


@pytest.mark.django_db(transaction=True)
def test_a_spooled_file_that_is_not_a_letter_is_set_aside_and_does_not_block_the_rest():
    from recovery.store.parking import ParkRecord, drain_spool, spool

    pending = spool()
    stray = pending.put({"unexpected": "shape"})
    pending.put(ParkRecord(task_id="behind-the-stray", task_name="x", kind="other",
                           reason="r").to_dict())
    assert drain_spool() == 1
    assert DeadLetter.objects.filter(task_id="behind-the-stray").exists()
    assert stray.with_suffix(".bad").exists() and not stray.exists()


def test_a_database_outage_spools_the_letter_and_still_hands_the_exception_on(monkeypatch):
    from django.db import OperationalError

    from recovery import events
    from recovery.store import parking

    def database_down(*args, **kwargs):
        raise OperationalError("connection refused")

    told = []

    def listener(record, letter_id, exc=None, **kw):
        told.append((letter_id, exc))

    monkeypatch.setattr(parking, "_write", database_down)
    events.letter_parked.connect(listener)
    failure = ValueError("card declined for order 1234")
    try:
        outcome = park(make_record(), exc=failure)
    finally:
        events.letter_parked.disconnect(listener)

    assert outcome.spooled is True and outcome.letter_id is None
    assert [path.name for path in spool().paths()] and len(list(spool().paths())) == 1
    # Sentry still gets the task's own exception (not the database's) for a spooled letter
    assert told == [(None, failure)]


# -- ids and values a column cannot hold ----------------------------------------------------------

ORIGINAL_ID = "recovery_original_task_id"


def sha256_id(task_id: str) -> str:
    import hashlib

    return "task-id-sha256-" + hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()


@db
def test_an_over_long_task_id_is_parked_under_its_hash_and_the_original_is_kept(park_via):
    long_id = "import-batch-2026-03-01/" + "row-" * 69  # 300 characters, as a client sent it
    assert len(long_id) == 300

    first = park_via(make_record(task_id=long_id))
    again = park_via(make_record(task_id=long_id))

    assert first.spooled is False and again.spooled is False
    assert len(spool()) == 0
    letter = DeadLetter.objects.get()
    assert first.letter_id == again.letter_id == letter.pk
    assert letter.task_id == sha256_id(long_id)
    assert len(letter.task_id) <= DeadLetter._meta.get_field("task_id").max_length
    assert letter.headers[ORIGINAL_ID] == long_id
    assert letter.headers["chain"] == [{"task": "tasks.ship_order"}]
    assert letter.attempts == 3


@db
def test_a_task_id_with_a_nul_is_parked_under_its_hash(park_via):
    nul_id = "7d4c0b5e\x00charge"
    outcome = park_via(make_record(task_id=nul_id))
    assert outcome.spooled is False
    letter = DeadLetter.objects.get()
    assert letter.task_id == sha256_id(nul_id)
    assert letter.headers[ORIGINAL_ID] == "7d4c0b5e\\x00charge"


@db
def test_an_over_long_task_id_keeps_its_failure_result_with_the_letter(park_via):
    backend = celery_app.backend
    long_id = "x" * 300
    record = make_record(task_id=long_id, result={
        "result": backend.prepare_exception(ValueError("card declined")), "traceback": "tb"})
    outcome = park_via(record, backend=backend, request=celery_request(make_record(task_id=long_id)))
    assert outcome.spooled is False and outcome.result_stored is True
    assert TaskResult.objects.get(task_id=sha256_id(long_id)).status == "FAILURE"


@db
def test_every_bounded_column_gets_a_value_that_fits(park_via):
    outcome = park_via(make_record(
        task_name="tasks." + "n" * 400, queue="q" * 400, worker="celery@" + "w" * 400,
        content_type="application/" + "c" * 300, kind="k" * 50, reason="r" * 400,
        exception_type="x." * 400,
    ))
    assert outcome.spooled is False
    letter = DeadLetter.objects.get()
    for name in ("task_name", "queue", "worker", "content_type", "kind", "reason",
                 "exception_type"):
        value = getattr(letter, name)
        assert 0 < len(value) <= DeadLetter._meta.get_field(name).max_length, name
    assert letter.task_name.startswith("tasks.nnn") and letter.task_name.endswith("chars cut]")


@db
def test_text_postgresql_cannot_encode_and_json_it_cannot_hold_are_cleaned(park_via):
    # A lone surrogate (from a bad decode) cannot be encoded as UTF-8; NaN and Infinity are
    # not JSON, and jsonb refuses them.
    outcome = park_via(make_record(
        exception_message="bad text \udce9 in order 1234",
        args=[float("nan"), float("inf"), "caf\udce9"],
        kwargs={"ratio": float("-inf")},
        history=attempts(1, message="bad text \udce9"),
    ))
    assert outcome.spooled is False
    letter = DeadLetter.objects.get()
    assert letter.exception_message == "bad text \\udce9 in order 1234"
    assert letter.args == ["NaN", "Infinity", "caf\\udce9"]
    assert letter.kwargs == {"ratio": "-Infinity"}


@db
def test_a_failure_result_the_database_refuses_does_not_stop_the_letter(park_via):
    # django-celery-results keeps the worker's hostname in a 100-character column: a longer
    # Celery hostname makes the FAILURE row unwritable, never the letter.
    backend = celery_app.backend
    record = make_record(worker="celery@" + "k8s-pod-" * 20,
                         result={"result": backend.prepare_exception(ValueError("declined")),
                                 "traceback": "tb"})
    outcome = park_via(record, backend=backend, request=celery_request(record))
    assert outcome.spooled is False
    assert outcome.result_stored is False  # Celery may then try to store it its own way
    letter = DeadLetter.objects.get()
    assert outcome.letter_id == letter.pk
    assert letter.worker == record.worker
    assert not TaskResult.objects.filter(task_id=record.task_id).exists()
    assert len(spool()) == 0


@pytest.fixture
def database_refusing_task():
    """A CHECK constraint that makes PostgreSQL itself refuse letters of one task name."""
    from django.db import connection

    table = DeadLetter._meta.db_table

    def refuse(task_name: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT test_refused '
                           f"CHECK (task_name <> %s) NOT VALID", [task_name])

    yield refuse
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT IF EXISTS test_refused')


@db
def test_a_letter_the_database_refuses_is_spooled_not_lost(park_via, database_refusing_task):
    database_refusing_task("tasks.refused")
    outcome = park_via(make_record(task_name="tasks.refused"))
    assert outcome.spooled is True and outcome.letter_id is None
    assert len(spool()) == 1
    assert not DeadLetter.objects.exists()


@db
def test_a_record_the_database_refuses_is_quarantined_and_the_letters_behind_it_drain(
        database_refusing_task, caplog):
    # Given a refused record spooled before two good ones, and an old unsanitised record
    database_refusing_task("tasks.refused")
    pending = spool()
    pending.put(make_record(task_id="first").to_dict())
    refused = pending.put(make_record(task_id="refused", task_name="tasks.refused").to_dict())
    pending.put({**make_record(task_id="long").to_dict(), "task_id": "y" * 300})
    pending.put(make_record(task_id="after").to_dict())

    # When the spool drains
    assert drain_spool() == 3

    # Then the good letters are in the table, the refused one is quarantined with its reason
    assert set(DeadLetter.objects.values_list("task_id", flat=True)) == \
        {"first", "after", sha256_id("y" * 300)}
    assert len(pending) == 0
    assert pending.quarantined() == 1
    bad = refused.with_suffix(".bad")
    assert bad.exists() and not refused.exists()
    assert "test_refused" in refused.with_suffix(".error").read_text()
    assert "quarantined" in caplog.text and "test_refused" in caplog.text


@db
def test_a_record_that_fails_for_any_reason_but_an_unreachable_database_is_quarantined():
    pending = spool()
    # A value the model refuses (ValidationError) / one that breaks the writer (AttributeError)
    refused = pending.put({**make_record(task_id="refused").to_dict(), "permanent": "maybe"})
    broken = pending.put({**make_record(task_id="broken").to_dict(), "failed_at": 12345})
    pending.put(make_record(task_id="after").to_dict())
    assert drain_spool() == 1
    assert list(DeadLetter.objects.values_list("task_id", flat=True)) == ["after"]
    assert refused.with_suffix(".bad").exists() and broken.with_suffix(".bad").exists()
    assert "ValidationError" in refused.with_suffix(".error").read_text()
    assert "AttributeError" in broken.with_suffix(".error").read_text()
    assert pending.quarantined() == 2


@pytest.fixture(params=["refuses", "hangs"])
def unreachable_database(request):
    """Point the default connection at a port that refuses connections, or at one that
    accepts them and never answers (the connect timeout, 3 s, gives up)."""
    import socket

    from django.db import connection

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if request.param == "hangs":
        sock.listen(1)
    port = sock.getsockname()[1]
    if request.param == "refuses":
        sock.close()
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(port))
    yield
    connection.close()
    connection.settings_dict.clear()
    connection.settings_dict.update(saved)
    sock.close()


@db
def test_an_unreachable_database_stops_the_drain_and_quarantines_nothing(unreachable_database):
    pending = spool()
    for n in range(3):
        pending.put(make_record(task_id=f"t{n}").to_dict())
    started = time.monotonic()
    assert drain_spool() == 0
    # one attempt, not one per record
    assert time.monotonic() - started < 6
    assert len(pending) == 3
    assert pending.quarantined() == 0


@db
def test_a_first_park_with_its_result_really_takes_the_single_statement_fast_path():
    # The row alone would exist after the general path too: count the statements.
    backend = celery_app.backend
    record = make_record(result={"result": backend.prepare_exception(ValueError("declined")),
                                 "traceback": "Traceback: declined"})
    with CaptureQueriesContext(connection) as queries:
        park(record, backend=backend, request=celery_request(record))
    tables = (DeadLetter._meta.db_table, TaskResult._meta.db_table)
    writes = [q["sql"] for q in queries.captured_queries
              if any(f'{verb} "{table}"' in q["sql"] for verb in ("INSERT INTO", "UPDATE")
                     for table in tables)]
    assert len(writes) == 1, writes
    assert writes[0].startswith("WITH letter AS (INSERT INTO")
    assert f'INSERT INTO "{TaskResult._meta.db_table}"' in writes[0]
    assert TaskResult.objects.get(task_id=record.task_id).status == "FAILURE"


@db
def test_a_brokers_copy_spooled_after_the_tasks_own_letter_adds_to_it_and_replaces_nothing():
    """The database is down: the task parks itself (spooled), then RabbitMQ dead-letters its
    message and the drain of recovery.dead_letters parks that copy (spooled too, after it).
    Drained in that order, the letter keeps the task's account and gains the broker's."""
    from recovery import events

    death = {"reason": "delivery_limit", "queue": "payments", "count": 1, "time": "",
             "delivery_count": 21}
    broker_copy = make_record(
        kind="poison", reason="RabbitMQ dead-lettered it after 21 deliveries", exception_type="",
        exception_message="RabbitMQ dead-lettered it", traceback="", raw_body="[[1234], {}]",
        history=[{"at": LATER, "attempt": 22, "replay": 0, "exception_type": "",
                  "exception_message": "RabbitMQ dead-lettered it", "kind": "poison",
                  "delay_seconds": None, "broker_death": death}],
        failed_at=LATER, keep_existing=True)
    spool().put(make_record().to_dict())
    time.sleep(0.01)
    spool().put(broker_copy.to_dict())
    told = []

    def listener(record, letter_id, **kw):
        told.append(record.kind)

    events.letter_parked.connect(listener)
    try:
        assert drain_spool() == 2
    finally:
        events.letter_parked.disconnect(listener)

    letter = DeadLetter.objects.get(task_id="7d4c0b5e-charge-1234")
    assert (letter.kind, letter.reason) == ("dependency",
                                            "gave up after 3 attempts (requests: HTTP 503)")
    assert letter.exception_type == "requests.exceptions.HTTPError"
    assert letter.history[:3] == make_record().history
    assert letter.history[-1]["broker_death"] == death
    assert told == ["dependency"], "the broker's copy is no second parking"
    # Parked directly (the database is back), the copy is merged the same way
    assert park(broker_copy).letter_id == letter.pk
    assert DeadLetter.objects.get(pk=letter.pk).history == letter.history


@db
def test_a_brokers_copy_of_a_task_never_parked_becomes_its_letter():
    record = make_record(task_id="only-the-broker", kind="poison", reason="dead-lettered",
                         keep_existing=True)
    assert park(record).spooled is False
    assert DeadLetter.objects.get(task_id="only-the-broker").kind == "poison"
