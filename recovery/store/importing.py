"""Letters read back from an export (a ``dlq export`` file, or a Kafka topic), upserted
by task id.

An export record (:func:`recovery.store.export.letter_record`) is input like any
message: whoever can write the file or the topic chose it. So a record is checked
before anything is written (:func:`parse`), and what it may set is an allow-list:

* **What it sets:** the letter's failure and state (:data:`IMPORTED`): task name,
  payload, execution options, raw body, status, kind, exception, traceback, attempts,
  replays, history, queue, worker, fingerprint and the failure times. Each value passes
  the bounds and cleaning of a parked letter (:class:`~recovery.store.parking.ParkRecord`),
  so a forged history or a NUL cannot get in where parking would refuse it.
* **What it never sets:** the row id, ``created_at``/``updated_at``, and the audit
  trail. A record's ``events`` are counted, never written: an import cannot put words in
  an operator's mouth. Each letter an import writes gets one ``imported`` event of its
  own instead, naming the actor and where the record came from.
* **A masked value stays masked.** A record from a masked export holds the mask
  (``••••••``) where its secrets were; the import stores it as it is and never fills it
  in from anywhere. A payload holding the mask cannot be replayed or compensated until an
  operator edits the real values in (:mod:`recovery.operations.replay` refuses it).
* **No saga reference crosses databases.** A saga step's letter names its run by id in
  its ``recovery_saga`` header: an id of the database it came from. The import keeps only
  the saga's secret keys from that header (the letter stays masked by them), so the
  letter is no saga's step here and compensating it cannot touch a run of this database.
* ``replaying`` becomes ``parked``: no replay is in flight here.

Upsert by task id, idempotent (:func:`upsert`):

* no letter with that task id: **created**;
* a letter whose fields already equal the record's: **unchanged** (nothing is written,
  not even an event), so importing the same records twice changes nothing;
* a letter an earlier import wrote and nothing has changed since (its fields still hash
  to what that import wrote): **updated** to the newer record;
* any other letter (one this database parked, or one an operator or a worker has
  changed since it was imported): **kept** as it is and reported. An import never
  overwrites what happened here.

An import sends no event: it is no failure here, so nothing is counted, reported to
Sentry or escalated (the metrics backlog, read from the table, does include the letters).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone as dt_timezone
from typing import IO, Any

from django.db import DatabaseError, IntegrityError, transaction
from django.utils.dateparse import parse_datetime

from ..core import headers as hdr
from .models import DeadLetter, DeadLetterEvent
from .parking import ParkRecord, letter_task_id

__all__ = ["IMPORTED", "MAX_RECORD_BYTES", "RecordError", "Incoming", "Report", "parse",
           "from_record", "upsert", "read_jsonl", "import_jsonl"]

#: The fields a record sets (everything else of a letter is this database's own).
IMPORTED = (
    "task_name", "args", "kwargs", "headers", "raw_body", "content_type", "status", "kind",
    "permanent", "reason", "exception_type", "exception_message", "traceback", "attempts",
    "replay_count", "history", "queue", "worker", "fingerprint", "first_failed_at",
    "last_failed_at",
)
#: Fields of an export record that are read but never written. A rehearsal's id names a
#: rehearsal of the database it was exported from, none of this one's.
_IGNORED = ("id", "created_at", "updated_at", "events", "rehearsal")
_KNOWN = frozenset(("task_id", *IMPORTED, *_IGNORED))

#: Largest record read (its JSON text, in bytes): a record that size is already far past
#: what one letter stores, and past what Kafka carries by default (1 MB).
MAX_RECORD_BYTES = 16 * 1024 * 1024

_TEXT = ("task_id", "task_name", "raw_body", "content_type", "status", "kind", "reason",
         "exception_type", "exception_message", "traceback", "queue", "worker", "fingerprint")
_COUNTS = ("attempts", "replay_count")
_COUNT_MAX = 2**31 - 1  # PositiveIntegerField
_FINGERPRINT = re.compile(r"^[0-9a-f]{40}$")
_COLUMNS = ("task_name", "content_type", "reason", "exception_type", "queue", "worker")


class RecordError(ValueError):
    """A record that cannot be imported as it is; the message says why. Reported with
    where the record was (a line, a partition and offset) and skipped: the rest go on."""


@dataclass(frozen=True)
class Incoming:
    """One checked record: the letter's task id and the values it sets (:data:`IMPORTED`)."""

    task_id: str
    values: dict[str, Any]
    events: int = 0  # audit events the record carried (not imported)

    @property
    def digest(self) -> str:
        return _digest(self.values)


@dataclass
class Report:
    """What an import did, record by record."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    #: letters left as they are: "<where>: <task id>: <why>"
    kept: list[str] = field(default_factory=list)
    #: records that could not be imported: "<where>: <why>"
    skipped: list[str] = field(default_factory=list)
    #: records with nothing to import (a Kafka tombstone)
    empty: int = 0

    @property
    def ok(self) -> bool:
        """False when a record could not be imported (the command then exits non-zero)."""
        return not self.skipped

    def skip(self, where: str, why: Any) -> None:
        self.skipped.append(f"{where}: {why}")

    def summary(self) -> str:
        parts = [f"{self.created} created", f"{self.updated} updated",
                 f"{self.unchanged} unchanged", f"{len(self.kept)} kept as they are",
                 f"{len(self.skipped)} skipped as malformed"]
        if self.empty:
            parts.append(f"{self.empty} empty (tombstones)")
        return ", ".join(parts)


# -- checking a record ----------------------------------------------------------------------


def parse(raw: bytes | str, *, max_bytes: int = MAX_RECORD_BYTES) -> Incoming:
    """One record from its JSON text.

    Raises:
        RecordError: larger than ``max_bytes``, not UTF-8, not JSON, or not a letter
            (:func:`from_record`).
    """
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise RecordError(f"{size} bytes, over the {max_bytes} bytes a record may have")
    try:
        data = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        raise RecordError("not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"not JSON ({str(exc)[:120]})") from None
    return from_record(data)


def _time(name: str, value: Any) -> datetime:
    parsed = parse_datetime(value) if isinstance(value, str) else None
    if parsed is None:
        raise RecordError(f"{name} is not an ISO date and time ({str(value)[:40]!r})")
    return parsed.replace(tzinfo=dt_timezone.utc) if parsed.tzinfo is None else parsed


def _checked(data: Mapping[str, Any]) -> None:
    """The record's shape: known fields only, all of them, each of its type."""
    unknown = sorted(str(name)[:40] for name in data if name not in _KNOWN)
    if unknown:
        raise RecordError(f"fields no export writes: {', '.join(unknown[:10])}")
    missing = [name for name in ("task_id", *IMPORTED) if name not in data]
    if missing:
        raise RecordError(f"missing fields: {', '.join(missing)}")
    wrong = [name for name in _TEXT if not isinstance(data[name], str)]
    wrong += [name for name in _COUNTS
              if isinstance(data[name], bool) or not isinstance(data[name], int)
              or not 0 <= data[name] <= _COUNT_MAX]
    wrong += [name for name, kind in (("args", list), ("history", list), ("kwargs", dict),
                                      ("headers", dict), ("permanent", bool))
              if not isinstance(data[name], kind)]
    if "events" in data and not isinstance(data["events"], list):
        wrong.append("events")
    if wrong:
        raise RecordError(f"fields of the wrong type: {', '.join(wrong)}")
    if not data["task_id"] or letter_task_id(data["task_id"]) != data["task_id"]:
        raise RecordError("task_id is empty, too long or not storable as it is")
    if not data["task_name"]:
        raise RecordError("task_name is empty")
    for name in _COLUMNS:
        limit = DeadLetter._meta.get_field(name).max_length
        if len(data[name]) > limit:
            raise RecordError(f"{name} is longer than its {limit} characters")
    if data["status"] not in DeadLetter.Status.values:
        raise RecordError(f"status {data['status'][:40]!r} is none of "
                          f"{', '.join(DeadLetter.Status.values)}")
    if data["kind"] not in DeadLetter.Kind.values:
        raise RecordError(f"kind {data['kind'][:40]!r} is none of "
                          f"{', '.join(DeadLetter.Kind.values)}")
    if not _FINGERPRINT.match(data["fingerprint"]):
        raise RecordError("fingerprint is not 40 lowercase hex digits")


def _without_saga_run(headers: dict) -> dict:
    """``headers`` whose ``recovery_saga`` header (at the top, or among the custom headers)
    keeps only the saga's secret keys: its run and step are ids of another database."""

    def keep_keys(value: Any) -> Any:
        keys = value.get("secret_keys") if isinstance(value, Mapping) else None
        return {"secret_keys": keys} if isinstance(keys, list) and keys else None

    cleaned = dict(headers)
    if hdr.SAGA in cleaned:
        cleaned[hdr.SAGA] = keep_keys(cleaned[hdr.SAGA])
    nested = cleaned.get("headers")
    if isinstance(nested, Mapping) and hdr.SAGA in nested:
        cleaned["headers"] = {**nested, hdr.SAGA: keep_keys(nested[hdr.SAGA])}
    return cleaned


def from_record(data: Any) -> Incoming:
    """One record (an export's decoded JSON object) checked and made storable.

    Raises:
        RecordError: not an object; a field missing, unknown, of the wrong type, longer
            than its column, or a value no letter can have (see the module docstring).
    """
    if not isinstance(data, Mapping):
        raise RecordError(f"not a JSON object but {type(data).__name__}")
    _checked(data)
    first_failed_at = _time("first_failed_at", data["first_failed_at"])
    last_failed_at = _time("last_failed_at", data["last_failed_at"])
    try:  # cleaned, scrubbed and bounded exactly as a parked letter is
        stored = ParkRecord(
            task_id=data["task_id"], task_name=data["task_name"], kind=data["kind"],
            reason=data["reason"], exception_type=data["exception_type"],
            exception_message=data["exception_message"], traceback=data["traceback"],
            args=data["args"], kwargs=data["kwargs"],
            headers=_without_saga_run(data["headers"]), raw_body=data["raw_body"],
            content_type=data["content_type"], permanent=data["permanent"],
            history=data["history"], queue=data["queue"], worker=data["worker"],
        )
    except (RecursionError, TypeError, ValueError) as exc:
        raise RecordError(f"cannot be stored as a letter ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from None
    status = data["status"]
    values = {
        "task_name": stored.task_name, "args": stored.args, "kwargs": stored.kwargs,
        "headers": stored.headers, "raw_body": stored.raw_body,
        "content_type": stored.content_type,
        "status": DeadLetter.Status.PARKED if status == DeadLetter.Status.REPLAYING else status,
        "kind": stored.kind, "permanent": stored.permanent, "reason": stored.reason,
        "exception_type": stored.exception_type,
        "exception_message": stored.exception_message, "traceback": stored.traceback,
        "attempts": data["attempts"], "replay_count": data["replay_count"],
        "history": stored.history, "queue": stored.queue, "worker": stored.worker,
        "fingerprint": data["fingerprint"], "first_failed_at": first_failed_at,
        "last_failed_at": last_failed_at,
    }
    return Incoming(data["task_id"], values, len(data.get("events") or ()))


# -- writing ----------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(dt_timezone.utc).isoformat()
    return str(value)


def _digest(values: Mapping[str, Any]) -> str:
    text = json.dumps({name: values[name] for name in IMPORTED}, sort_keys=True,
                      default=_canonical, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def _stored_values(pk: int) -> dict[str, Any]:
    """The importable fields of a letter as the database returns them."""
    return DeadLetter.objects.filter(pk=pk).values(*IMPORTED).get()


_IMPORT_OUTCOME = re.compile(r"\brecord:(?P<record>[0-9a-f]{16}) row:(?P<row>[0-9a-f]{16})$")


def _last_import(letter: DeadLetter) -> re.Match | None:
    """The digests the latest import of ``letter`` wrote down, or None if none wrote it."""
    event = (letter.events.filter(action=DeadLetterEvent.Action.IMPORTED)
             .order_by("-at", "-pk").values_list("outcome", flat=True).first())
    return _IMPORT_OUTCOME.search(event) if event else None


def _note(source: str, where: str, incoming: Incoming) -> str:
    trail = (f"; its source's audit trail ({incoming.events} event"
             f"{'s' if incoming.events != 1 else ''}) is not imported" if incoming.events else "")
    return f"from {source}, {where}{trail}"


def _write_one(incoming: Incoming, *, where: str, source: str, actor: str,
               report: Report) -> None:
    """Upsert one record, in the caller's transaction (the row locked while it is decided)."""
    letter = DeadLetter.objects.select_for_update().filter(task_id=incoming.task_id).first()
    if letter is None:
        try:
            with transaction.atomic():
                letter = DeadLetter.objects.create(task_id=incoming.task_id, **incoming.values)
        except IntegrityError:
            # A worker parked this task id a moment ago: that letter is this database's own.
            letter = DeadLetter.objects.select_for_update().filter(
                task_id=incoming.task_id).first()
            if letter is None:
                raise
        else:
            _record(letter, "created", incoming, where=where, source=source, actor=actor)
            report.created += 1
            return
    current = {name: getattr(letter, name) for name in IMPORTED}
    if current == incoming.values:
        report.unchanged += 1
        return
    last = _last_import(letter)
    if last is None or last["row"] != _digest(current):
        why = ("a letter of this database, which an import never overwrites" if last is None
               else "changed here since it was imported; an import never overwrites that")
        report.kept.append(f"{where}: {incoming.task_id}: {why}")
        return
    if last["record"] == incoming.digest:
        report.unchanged += 1  # the same record again (its values read back unequal)
        return
    for name, value in incoming.values.items():
        setattr(letter, name, value)
    letter.save()
    _record(letter, "updated", incoming, where=where, source=source, actor=actor)
    report.updated += 1


def _record(letter: DeadLetter, outcome: str, incoming: Incoming, *, where: str,
            source: str, actor: str) -> None:
    """The letter's ``imported`` event: who, from where, and the digests that tell a later
    import whether anything has changed the letter since."""
    row = _digest(_stored_values(letter.pk))
    DeadLetterEvent.objects.create(
        letter=letter, action=DeadLetterEvent.Action.IMPORTED, actor=actor,
        note=_note(source, where, incoming),
        outcome=f"{outcome} record:{incoming.digest} row:{row}",
    )


def upsert(batch: Iterable[tuple[Incoming, str]], *, actor: str, source: str,
           report: Report, after_commit: Callable[[], None] | None = None) -> None:
    """Upsert ``batch`` (records with where each was read) in one transaction.

    A record the database refuses is rolled back alone (a savepoint) and reported as
    skipped; the others are written. ``after_commit`` runs only once the transaction has
    committed (Kafka commits its offsets there), never if it rolls back.

    Raises:
        django.db.DatabaseError: the database is unreachable or refused the transaction;
            nothing of the batch is written and ``after_commit`` does not run.
    """
    with transaction.atomic():
        for incoming, where in batch:
            try:
                with transaction.atomic():
                    _write_one(incoming, where=where, source=source, actor=actor,
                               report=report)
            except (IntegrityError, DatabaseError) as refused:
                if not _refuses_record(refused):
                    raise
                report.skip(where, f"the database refused it ({str(refused).strip()[:200]})")
        if after_commit is not None:
            transaction.on_commit(after_commit)


def _refuses_record(error: DatabaseError) -> bool:
    """Whether the database refuses this record (its data) rather than being unreachable."""
    from_driver = getattr(error, "__cause__", None)
    sqlstate = getattr(from_driver, "sqlstate", None) or ""
    # Class 22: data exception; class 23: integrity constraint violation.
    return sqlstate[:2] in ("22", "23") or isinstance(error, IntegrityError)


# -- a JSON lines file ------------------------------------------------------------------------


def read_jsonl(stream: IO[bytes], *, max_bytes: int = MAX_RECORD_BYTES,
               report: Report) -> Iterator[tuple[Incoming, str]]:
    """The records of a JSON lines export, each with its line (``line 3``); a malformed
    line is reported and skipped. Reads one line at a time, none longer than
    ``max_bytes``."""
    number = 0
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        number += 1
        where = f"line {number}"
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the oversized line
                line = stream.readline(max_bytes + 1)
            report.skip(where, f"longer than the {max_bytes} bytes a record may have")
            continue
        if not line.strip():
            continue
        try:
            yield parse(line, max_bytes=max_bytes), where
        except RecordError as exc:
            report.skip(where, exc)


def import_jsonl(stream: IO[bytes], *, actor: str, source: str, batch_size: int = 500,
                 max_bytes: int = MAX_RECORD_BYTES, report: Report | None = None) -> Report:
    """Import a JSON lines export (``dlq export`` without ``--format csv``), ``batch_size``
    records per transaction."""
    report = report if report is not None else Report()
    batch: list[tuple[Incoming, str]] = []
    for item in read_jsonl(stream, max_bytes=max_bytes, report=report):
        batch.append(item)
        if len(batch) >= batch_size:
            upsert(batch, actor=actor, source=source, report=report)
            batch = []
    if batch:
        upsert(batch, actor=actor, source=source, report=report)
    return report
