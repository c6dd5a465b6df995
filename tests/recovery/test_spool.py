"""recovery.store.spool: a durable directory of JSON records, drained oldest first."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.store.spool import BadRecord, Spool


class DatabaseStillDown(Exception):
    pass


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool")


# -- put ----------------------------------------------------------------------------------------


def test_put_writes_a_json_file_holding_the_record(spool):
    record = {"task_id": "abc", "args": [1, "two"], "kwargs": {"x": None}, "permanent": True}
    path = spool.put(record)
    assert path.parent == spool.directory
    assert path.suffix == ".json"
    assert json.loads(path.read_text("utf-8")) == record


def test_put_leaves_no_temporary_files(spool):
    for n in range(5):
        spool.put({"n": n})
    names = files_in(spool.directory)
    assert len(names) == 5
    assert all(name.endswith(".json") and not name.startswith(".") for name in names)


def test_put_creates_missing_directories(tmp_path):
    spool = Spool(tmp_path / "a" / "b" / "spool")
    spool.put({"n": 1})
    assert len(spool) == 1


def test_put_accepts_a_directory_given_as_a_string(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    assert spool.put({"n": 1}).exists()


def test_put_writes_values_json_cannot_hold_as_text(spool):
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    path = spool.put({"failed_at": when})
    assert json.loads(path.read_text("utf-8")) == {"failed_at": str(when)}


def test_put_keeps_non_ascii_text(spool):
    record = {"message": "Zahlung für Bestellung 12 abgelehnt ✗ \x00"}
    assert json.loads(spool.put(record).read_bytes()) == record


def test_put_file_names_sort_in_the_order_written(spool):
    paths = [spool.put({"n": n}) for n in range(20)]
    assert sorted(paths) == paths


def test_the_spool_files_are_private(spool):
    assert spool.put({"secret": "card"}).stat().st_mode & 0o077 == 0


# -- len ----------------------------------------------------------------------------------------


def test_len_counts_the_records(spool):
    assert len(spool) == 0  # the directory does not even exist yet
    for n in range(3):
        spool.put({"n": n})
    assert len(spool) == 3


def test_len_ignores_other_files(spool):
    spool.put({"n": 1})
    (spool.directory / "notes.txt").write_text("hello")
    (spool.directory / "old.bad").write_text("{")
    (spool.directory / ".half-written.json.tmp").write_text("{")
    assert len(spool) == 1


# -- drain --------------------------------------------------------------------------------------


def test_drain_hands_records_oldest_first_and_deletes_them(spool):
    for n in range(5):
        spool.put({"n": n})
    seen = []
    assert spool.drain(seen.append) == 5
    assert seen == [{"n": n} for n in range(5)]
    assert len(spool) == 0
    assert files_in(spool.directory) == []


def test_drain_of_an_empty_or_missing_spool_does_nothing(tmp_path):
    seen = []
    assert Spool(tmp_path / "missing").drain(seen.append) == 0
    assert Spool(tmp_path).drain(seen.append) == 0
    assert seen == []


def test_a_handler_that_raises_stops_the_drain_and_keeps_the_record(spool):
    for n in range(3):
        spool.put({"n": n})
    seen = []

    def handler(record):
        if record["n"] == 1:
            raise DatabaseStillDown()
        seen.append(record)

    with pytest.raises(DatabaseStillDown):
        spool.drain(handler)
    assert seen == [{"n": 0}]
    assert len(spool) == 2
    remaining = [json.loads(p.read_text()) for p in spool.paths()]
    assert remaining == [{"n": 1}, {"n": 2}]

    # Once the database is back, the next drain picks up where the last one stopped.
    assert spool.drain(seen.append) == 2
    assert seen == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert len(spool) == 0


def test_an_invalid_json_file_is_renamed_bad_not_deleted(spool):
    spool.put({"n": 0})
    spool.directory.mkdir(parents=True, exist_ok=True)
    broken = spool.directory / "00000000000000000001-broken.json"
    broken.write_text('{"task_id": "abc", "args": [1, ')
    spool.put({"n": 1})
    seen = []
    assert spool.drain(seen.append) == 2
    assert seen == [{"n": 0}, {"n": 1}]
    assert not broken.exists()
    kept = spool.directory / "00000000000000000001-broken.bad"
    assert kept.read_text() == '{"task_id": "abc", "args": [1, '
    assert len(spool) == 0
    why = spool.directory / "00000000000000000001-broken.error"
    assert files_in(spool.directory) == [kept.name, why.name]
    assert "JSONDecodeError" in why.read_text()


def test_a_file_that_is_not_utf8_is_renamed_bad(spool):
    spool.directory.mkdir(parents=True)
    broken = spool.directory / "00000000000000000001-binary.json"
    broken.write_bytes(b"\xff\xfe\x00garbage")
    assert spool.drain(lambda record: None) == 0
    assert (spool.directory / "00000000000000000001-binary.bad").read_bytes() == \
        b"\xff\xfe\x00garbage"


def test_drain_stops_at_the_limit(spool):
    for n in range(5):
        spool.put({"n": n})
    seen = []
    assert spool.drain(seen.append, limit=2) == 2
    assert seen == [{"n": 0}, {"n": 1}]
    assert len(spool) == 3
    assert spool.drain(seen.append, limit=0) == 0
    assert len(spool) == 3


def test_draining_twice_hands_each_record_once(spool):
    spool.put({"n": 1})
    seen = []
    spool.drain(seen.append)
    spool.drain(seen.append)
    assert seen == [{"n": 1}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
records = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


@settings(max_examples=50, deadline=None)
@given(batch=st.lists(records, max_size=6))
def test_every_record_put_comes_back_once_in_order(batch):
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory)
        for record in batch:
            spool.put(record)
        assert len(spool) == len(batch)
        seen = []
        assert spool.drain(seen.append) == len(batch)
        assert seen == batch
        assert len(spool) == 0
        assert list(Path(directory).iterdir()) == []


# -- writes the disk takes in pieces, and writers that crash ----------------------------------


def test_put_writes_the_whole_record_when_the_disk_takes_a_few_bytes_per_write(spool, monkeypatch):
    # os.write may write fewer bytes than asked (a signal, a nearly full disk): here at most
    # 7 bytes per call, the real bytes, through the real file descriptor.
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", short_write)
    record = {"task_id": "abc", "args": list(range(30)), "message": "Zahlung für 12 ✗"}
    path = spool.put(record)
    monkeypatch.undo()
    assert len(calls) > 1
    assert json.loads(path.read_bytes()) == record


def test_a_write_the_disk_refuses_leaves_no_temporary_file(spool, monkeypatch):
    real_write = os.write

    def disk_full_after_some_bytes(fd, data):
        if len(data) < 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:10]))

    monkeypatch.setattr(os, "write", disk_full_after_some_bytes)
    with pytest.raises(OSError):
        spool.put({"task_id": "abc", "message": "x" * 100})
    monkeypatch.undo()
    assert files_in(spool.directory) == []


def test_drain_removes_temporary_files_of_crashed_writers_but_not_of_writers_in_progress(spool):
    spool.put({"n": 1})
    crashed = spool.directory / ".00000000000000000001-crashed.json.tmp"
    crashed.write_text('{"n": ')
    an_hour_ago = time.time() - 3600
    os.utime(crashed, (an_hour_ago, an_hour_ago))
    in_progress = spool.directory / f".{time.time_ns():020d}-writing.json.tmp"
    in_progress.write_text('{"n": ')
    seen = []

    assert spool.drain(seen.append) == 1

    assert seen == [{"n": 1}]
    assert files_in(spool.directory) == [in_progress.name]


# -- quarantine: one bad record never blocks the rest -----------------------------------------


def test_a_record_the_handler_rejects_is_quarantined_with_its_reason_and_the_rest_drain(spool):
    for n in range(4):
        spool.put({"n": n})
    seen = []

    def handler(record):
        if record["n"] == 1:
            raise BadRecord("the database refused it: value too long for type varchar(255)")
        seen.append(record)

    assert spool.drain(handler) == 3

    assert seen == [{"n": 0}, {"n": 2}, {"n": 3}]
    assert len(spool) == 0
    assert spool.quarantined() == 1
    [bad] = spool.quarantined_paths()
    assert json.loads(bad.read_text()) == {"n": 1}
    reason = bad.with_suffix(".error").read_text()
    assert "value too long for type varchar(255)" in reason
    # A second drain leaves the quarantined record alone.
    assert spool.drain(handler) == 0
    assert spool.quarantined() == 1 and seen == [{"n": 0}, {"n": 2}, {"n": 3}]


def test_quarantined_counts_only_bad_files(spool):
    assert spool.quarantined() == 0  # the directory does not even exist yet
    spool.put({"n": 1})
    spool.directory.mkdir(parents=True, exist_ok=True)
    (spool.directory / "00000000000000000001-a.bad").write_text("{")
    (spool.directory / "00000000000000000001-a.error").write_text("JSONDecodeError")
    (spool.directory / "00000000000000000002-b.bad").write_text("{}")
    assert spool.quarantined() == 2
    assert len(spool) == 1


def test_requeued_records_go_back_in_line_in_their_old_place(spool):
    for n in range(3):
        spool.put({"n": n})

    def refuse_one(record):
        if record["n"] == 1:
            raise BadRecord("refused")

    spool.drain(refuse_one)
    spool.put({"n": 3})
    assert spool.requeue_quarantined() == 1
    assert spool.quarantined() == 0
    seen = []
    assert spool.drain(seen.append) == 2
    assert seen == [{"n": 1}, {"n": 3}]
    assert files_in(spool.directory) == []
