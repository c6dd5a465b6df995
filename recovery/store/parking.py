"""park(): write exactly one dead letter per task id, and never lose one.

The letter (and, when given, the task's FAILURE result) is written in one
transaction. If the database cannot take it, the record goes to the local
fsynced spool (:mod:`recovery.store.spool`) and :func:`drain_spool`, run by the
workers every few seconds, writes it later through the same code path. The
caller acknowledges the broker message only after ``park`` returns, so a
task is always either in the table, in the spool, or still on the broker.

Every value is made storable before the first write (:class:`ParkRecord`): text is
cut to its column, NUL and unencodable characters are escaped, and a task id no
column can hold is replaced by its hash. What the database still refuses is not an
outage: a FAILURE result it refuses is left out (the letter stands), and a letter
it refuses is spooled, and the drain quarantines it (``*.bad``, counted and
alerted on) instead of retrying it in front of every letter behind it.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone as dt_timezone
from functools import lru_cache
from typing import Any

from celery import states
from django.db import Error as DatabaseError
from django.db import (IntegrityError, InterfaceError, OperationalError,
                       transaction)
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .. import conf, events
from . import deferred, pg_fastpath
from .connections import discard_broken_connections
from ..core import redaction
from ..core import headers as hdr
from ..core.bounds import attempt_count, bounded, cut
from ..core.fingerprint import fingerprint
from .models import DeadLetter
from .spool import BadRecord, Spool
from ..core.names import logger_for

__all__ = ["ParkRecord", "ParkOutcome", "park", "drain_spool", "spool", "letter_task_id",
           "database_unreachable"]

logger = logger_for(__name__)


def _clean(text: str) -> str:
    """Text PostgreSQL can store: NUL escaped (text columns cannot hold it), and lone
    surrogates, which cannot be encoded as UTF-8 (a bad decode upstream), escaped too."""
    text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _bounded(text: str, limit: int) -> str:
    return cut(_clean(text), limit)


def _nul_free(value: Any) -> Any:
    """JSON data jsonb accepts: every string cleaned (jsonb rejects \\u0000 too), and NaN
    and the infinities, which are not JSON, spelled as strings."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_nul_free(v) for v in value]
    if isinstance(value, dict):
        return {_nul_free(k): _nul_free(v) for k, v in value.items()}
    return value


@lru_cache(maxsize=None)
def _max_length(column: str) -> int:
    return int(DeadLetter._meta.get_field(column).max_length)


def letter_task_id(task_id: str) -> str:
    """The id a letter is stored under: ``task_id`` itself, or its hash when no column can
    hold it (longer than the column, or holding NUL or unencodable characters).

    A client may send any string as a Celery task id. The hash is deterministic, so the
    same task parks onto the same letter (parking stays idempotent), and it reads the way
    poison ids do (``poison-<sha256>``); :func:`park` keeps the original in the letter's
    headers (``recovery_original_task_id``).
    """
    task_id = str(task_id)
    if len(task_id) <= _max_length("task_id") and _clean(task_id) == task_id:
        return task_id
    return "task-id-sha256-" + hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()


def database_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached now (refused, reset, timed
    out, shutting down), rather than that it refuses this record."""
    return isinstance(error, (OperationalError, InterfaceError))


#: SQLSTATEs of a statement that lost a lock: deadlock_detected, lock_not_available.
_LOCK_LOST = ("40P01", "55P03")


def _lost_a_lock(error: BaseException) -> bool:
    return getattr(getattr(error, "__cause__", None), "sqlstate", None) in _LOCK_LOST


@dataclass
class ParkRecord:
    """Everything a dead letter holds, as plain JSON-safe data (it may sit in the spool)."""

    task_id: str
    task_name: str
    kind: str
    reason: str
    exception_type: str = ""
    exception_message: str = ""
    traceback: str = ""
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    raw_body: str = ""
    content_type: str = ""
    permanent: bool = False
    history: list = field(default_factory=list)
    replay: int = 0
    queue: str = ""
    worker: str = ""
    failed_at: str = field(default_factory=lambda: timezone.now().isoformat())
    # The FAILURE result to store with the letter: {"result": <backend-ready exception
    # dict>, "traceback": str}; None when the caller stores it elsewhere.
    result: dict | None = None
    # A second account of a task that may be parked already (the broker's copy of a
    # message it dead-lettered): it never replaces a parked letter, whose own account says
    # more; its history entries are added to that letter. Kept through the spool, so the
    # order in which spooled records drain cannot let it overwrite.
    keep_existing: bool = False
    # The rehearsal (recovery.workflows.rehearsals) whose injected fault failed the task.
    rehearsal: str = ""

    def __post_init__(self) -> None:
        # Exceptions quote their arguments: the secrets among them are scrubbed from the
        # text before anything (the fingerprint, search, a page) can see it.
        (self.exception_message, self.traceback, self.history,
         self.headers) = redaction.scrubbed_failure(self)
        # Every value is made storable here, before the first write and before the spool,
        # so that a record can fail to be written only because the database is down.
        # Escaped before they are cut: an escape lengthens the text (NUL is four
        # characters once escaped), and the cut is what keeps it within its bound.
        self.exception_message = _clean(self.exception_message)
        self.traceback = _clean(self.traceback)
        bounded(self)  # recovery.core.bounds: what one letter stores, whatever a client sent
        for name in ("task_name", "kind", "reason", "exception_type", "queue", "worker",
                     "content_type", "rehearsal"):
            setattr(self, name, _bounded(str(getattr(self, name) or ""), _max_length(name)))
        # A NUL anywhere (an argument, a message in the history, a poison body) would make
        # every write fail, and the letter would sit in the spool forever.
        for name in ("args", "kwargs", "headers", "history"):
            setattr(self, name, _nul_free(getattr(self, name)))
        stored_id = letter_task_id(self.task_id)
        if stored_id != self.task_id:
            self.headers = {**(self.headers if isinstance(self.headers, dict) else {}),
                            hdr.ORIGINAL_TASK_ID: _clean(str(self.task_id))}
            self.task_id = stored_id
        if "\x00" in (self.raw_body or ""):
            self.raw_body = "base64:" + base64.b64encode(
                self.raw_body.encode("utf-8", "surrogatepass")).decode("ascii")
        else:
            self.raw_body = _clean(self.raw_body or "")
        if self.result is not None and isinstance(self.result.get("traceback"), str):
            self.result = {**self.result, "traceback": _nul_free(self.result["traceback"])}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParkRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ParkOutcome:
    letter_id: int | None
    spooled: bool
    result_stored: bool


def spool() -> Spool:
    return Spool(conf.spool_dir())


def park(record: ParkRecord, *, backend: Any = None, request: Any = None,
         exc: BaseException | None = None) -> ParkOutcome:
    """Write ``record`` as the task's one dead letter; spool it if the database is down.

    Args:
        record: the letter.
        backend: a Celery result backend; when given with ``record.result``, the FAILURE
            result is stored in the same transaction (atomic with a django-db backend).
            If the database refuses the result row, the letter is written without it
            (``result_stored`` is then False).
        request: the Celery request, for the backend's extended result fields.
        exc: the exception, when the caller has it (Sentry then gets its stack frames).

    Raises:
        OSError: only when the database *and* the spool directory both refuse the
            record; the caller must then not acknowledge the message.
    """
    for attempt in (1, 2):
        try:
            letter_id, result_stored, merged = _write(record, backend, request)
        except Exception as write_error:  # noqa: BLE001 - not `exc`: that is the task's
            if isinstance(write_error, DatabaseError):
                # A stale connection (database restarted) fails once; a fresh one may work.
                discard_broken_connections()
            if not database_unreachable(write_error):
                # The record was cleaned, and still the database (or the write) refuses
                # it: retrying will not help, and the broker message must not be lost or
                # redelivered forever. The spool keeps it, and its drain quarantines it
                # where an operator is alerted (recovery_spool_quarantined).
                logger.error(
                    "recovery: the database refused dead letter %s[%s] (%s: %s); spooling it "
                    "for an operator", record.task_name, record.task_id,
                    type(write_error).__name__, write_error,
                )
                break
            if attempt == 2:
                logger.warning(
                    "recovery: database unavailable while parking %s[%s] (%s); spooling",
                    record.task_name, record.task_id, write_error,
                )
        else:
            if not merged:
                events.letter_parked.send(record=record, letter_id=letter_id, exc=exc,
                                          first_report=True)
            return ParkOutcome(letter_id, spooled=False, result_stored=result_stored)
    path = spool().put(record.to_dict())
    logger.warning("recovery: spooled dead letter %s[%s] to %s", record.task_name, record.task_id, path)
    events.letter_parked.send(record=record, letter_id=None, exc=exc, first_report=True)
    return ParkOutcome(None, spooled=True, result_stored=record.result is not None)


def _parse_time(value: str) -> datetime:
    parsed = parse_datetime(value) if isinstance(value, str) else value
    if parsed is None:
        return timezone.now()
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=dt_timezone.utc)
    return parsed


def _merge_history(existing: list, record: ParkRecord) -> list:
    # Entries of other runs (earlier replays) stay; this run's entries are replaced by
    # the record's, which already holds the whole run. A redelivered message that fails
    # again therefore never counts its attempts twice.
    kept = [e for e in existing or [] if e.get("replay", 0) != record.replay]
    return kept + list(record.history)


def _write(record: ParkRecord, backend: Any, request: Any) -> tuple[int, bool, bool]:
    """Upsert the letter (and store its FAILURE result); returns (letter id, result stored,
    merged): merged when a ``keep_existing`` record only added history to a parked letter,
    which is no new parking to report."""
    failed_at = _parse_time(record.failed_at)
    values = dict(
        task_name=record.task_name,
        args=record.args,
        kwargs=record.kwargs,
        headers=record.headers,
        raw_body=record.raw_body,
        content_type=record.content_type,
        status=DeadLetter.Status.PARKED,
        kind=record.kind,
        permanent=record.permanent,
        reason=record.reason,
        exception_type=record.exception_type,
        exception_message=record.exception_message,
        traceback=record.traceback,
        queue=record.queue or "",
        worker=record.worker or "",
        rehearsal=record.rehearsal or "",
        fingerprint=fingerprint(record.task_name, record.exception_type, record.exception_message),
        last_failed_at=failed_at,
    )
    with_result = record.result is not None and backend is not None
    if pg_fastpath.applicable(backend):
        history = list(record.history)
        try:
            letter_id = pg_fastpath.insert_new_letter(
                {"task_id": record.task_id, "history": history, "attempts": attempt_count(history),
                 "first_failed_at": failed_at, **values},
                record, backend, request,
            )
        except DatabaseError as refused:
            if database_unreachable(refused) and not _lost_a_lock(refused):
                raise
            # The one statement holds the letter, the result and the incident link: the
            # general path below tells which of them the database refuses, and writes what
            # it can. A deadlock or a lock not granted (the incident's row) is the
            # statement's, not the letter's: the general path writes the letter without it.
            letter_id = None
        if letter_id is not None:
            return letter_id, with_result, False
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(task_id=record.task_id).first()
        if letter is None:
            history = list(record.history)
            try:
                with transaction.atomic():
                    letter = DeadLetter.objects.create(
                        task_id=record.task_id,
                        history=history,
                        attempts=attempt_count(history),
                        first_failed_at=failed_at,
                        **values,
                    )
            except IntegrityError:
                # Another worker parked the same task id a moment ago: merge into it. Any
                # other constraint the row breaks is no race: re-raise it.
                letter = DeadLetter.objects.select_for_update().filter(task_id=record.task_id).first()
                if letter is None:
                    raise
        if record.keep_existing and letter.status == values["status"]:
            added = [entry for entry in record.history if entry not in letter.history]
            if added:
                letter.history = list(letter.history) + added
                letter.save(update_fields=["history", "updated_at"])
            return letter.pk, False, True
        if letter.history != record.history or letter.attempts == 0 or letter.status != values["status"]:
            history = _merge_history(letter.history, record)
            for name, value in values.items():
                if name in ("raw_body", "content_type") and not record.raw_body:
                    continue  # a re-park by the task keeps the original message's body
                if name == "rehearsal" and not value:
                    continue  # a replay of a rehearsed letter that fails again stays rehearsed
                setattr(letter, name, value)
            letter.history = history
            letter.attempts = attempt_count(history)
            letter.save()
        result_stored = with_result and _store_failure(backend, record, request)
    return letter.pk, result_stored, False


def _store_failure(backend: Any, record: ParkRecord, request: Any) -> bool:
    """Store the FAILURE result beside the letter; False if the database refuses the row.

    Our bookkeeping is never the task's failure, nor the letter's: a result row the
    database refuses (a worker hostname longer than django-celery-results' column) is left
    out, and Celery then stores the result its own way or reports why it cannot.
    """
    try:
        with transaction.atomic():
            backend.store_result(
                record.task_id,
                record.result["result"],
                states.FAILURE,
                traceback=record.result.get("traceback"),
                request=request,
            )
    except DatabaseError as refused:
        if database_unreachable(refused):
            raise
        logger.warning("recovery: parked %s[%s] without its FAILURE result, which the "
                       "database refused (%s)", record.task_name, record.task_id, refused)
        return False
    return True


def drain_spool(backend: Any = None, limit: int | None = None) -> int:
    """Move spooled letters into the table; returns how many were written.

    Safe to call from every worker at once and from ``manage.py dlq drain``. A record the
    database refuses, or that cannot be written for any reason but an unreachable
    database, is quarantined and the drain goes on; an unreachable database stops it until
    the next call.
    """
    pending = spool()

    def write(data: dict) -> None:
        if deferred.is_deferred(data):  # a result, replay or saga write, not a letter
            deferred.apply(data, backend)
            return
        try:
            record = ParkRecord.from_dict(data)
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadRecord(f"not a dead-letter record: {exc}") from exc
        letter_id, _result_stored, merged = _write(record, backend, None)
        if not merged:
            events.letter_parked.send(record=record, letter_id=letter_id, exc=None,
                                      first_report=False)

    try:
        drained = pending.drain(_quarantine_unless_unreachable(write), limit=limit)
    except DatabaseError as exc:
        discard_broken_connections()
        logger.info("recovery: spool not drained yet, database still unavailable (%s)", exc)
        return 0
    if drained:
        logger.warning("recovery: drained %d spooled dead letter(s) into the database", drained)
    return drained


def _quarantine_unless_unreachable(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    """``handler`` as the spool expects it: any failure but an unreachable database means
    the record can never be written (:class:`BadRecord`), so it must not block the rest."""

    def handle(data: dict) -> None:
        try:
            handler(data)
        except BadRecord:
            raise
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed
            if database_unreachable(exc):
                raise
            if isinstance(exc, DatabaseError):
                discard_broken_connections()
            raise BadRecord(f"{type(exc).__name__}: {exc}") from exc

    return handle
