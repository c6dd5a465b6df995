"""park(): write exactly one dead letter per task id, and never lose one.

The letter (and, when given, the task's FAILURE result) is written in one
transaction. If the database cannot take it, the record goes to the local
fsynced spool (:mod:`recovery.spool`) and :func:`drain_spool`, run by the
workers every few seconds, writes it later through the same code path. The
caller acknowledges the broker message only after ``park`` returns, so a
task is always either in the table, in the spool, or still on the broker.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone as dt_timezone
from typing import Any

from django.db import Error as DatabaseError
from django.db import IntegrityError, close_old_connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import conf, deferred, escalation, metrics
from .fingerprint import fingerprint
from .models import DeadLetter
from .spool import BadRecord, Spool

__all__ = ["ParkRecord", "ParkOutcome", "park", "drain_spool", "spool"]

logger = logging.getLogger(__name__)


def _bounded(text: str, limit: int) -> str:
    text = text.replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL
    if len(text) <= limit:
        return text
    if limit < 30:  # no room for the "... [N chars cut]" marker
        return text[: max(limit, 0)]
    return text[: limit - 30] + f"... [{len(text) - limit + 30} chars cut]"


def _nul_free(value: Any) -> Any:
    """JSON data with NUL escaped in every string: PostgreSQL jsonb rejects \\u0000."""
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, list):
        return [_nul_free(v) for v in value]
    if isinstance(value, dict):
        return {_nul_free(k): _nul_free(v) for k, v in value.items()}
    return value


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

    def __post_init__(self) -> None:
        self.exception_message = _bounded(self.exception_message or "", int(conf.get("MESSAGE_MAX_CHARS")))
        self.traceback = _bounded(self.traceback or "", int(conf.get("TRACEBACK_MAX_CHARS")))
        # A NUL anywhere (an argument, a message in the history, a poison body) would make
        # every write fail, and the letter would sit in the spool forever.
        for name in ("args", "kwargs", "headers", "history", "task_name", "queue", "worker",
                     "content_type"):
            setattr(self, name, _nul_free(getattr(self, name)))
        if "\x00" in (self.raw_body or ""):
            self.raw_body = "base64:" + base64.b64encode(self.raw_body.encode("utf-8")).decode("ascii")
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
        request: the Celery request, for the backend's extended result fields.
        exc: the exception, when the caller has it (Sentry then gets its stack frames).

    Raises:
        OSError: only when the database *and* the spool directory both refuse the
            record; the caller must then not acknowledge the message.
    """
    for attempt in (1, 2):
        try:
            letter_id = _write(record, backend, request)
            metrics.dead_letter_parked(record.task_name, record.kind, record.replay)
            escalation.on_parked(record, letter_id, exc)
            return ParkOutcome(letter_id, spooled=False, result_stored=record.result is not None)
        except DatabaseError as db_error:  # not `exc`: that name is the task's exception
            # A stale connection (database restarted) fails once; a fresh one may work.
            discard_broken_connections()
            if attempt == 2:
                logger.warning(
                    "recovery: database unavailable while parking %s[%s] (%s); spooling",
                    record.task_name, record.task_id, db_error,
                )
    path = spool().put(record.to_dict())
    logger.warning("recovery: spooled dead letter %s[%s] to %s", record.task_name, record.task_id, path)
    metrics.dead_letter_parked(record.task_name, record.kind, record.replay)
    escalation.on_parked(record, None, exc)
    return ParkOutcome(None, spooled=True, result_stored=record.result is not None)


def discard_broken_connections() -> None:
    """Drop connections the database has broken, so the next query reconnects."""
    try:
        close_old_connections()
    except Exception:  # noqa: BLE001 - closing a dead connection may itself fail
        pass
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and not connection.in_atomic_block:
            try:
                if not connection.is_usable():
                    connection.close()
            except Exception:  # noqa: BLE001
                pass


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


def _write(record: ParkRecord, backend: Any, request: Any) -> int:
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
        reason=_bounded(record.reason, 255),
        exception_type=_bounded(record.exception_type, 255),
        exception_message=record.exception_message,
        traceback=record.traceback,
        queue=record.queue or "",
        worker=record.worker or "",
        fingerprint=fingerprint(record.task_name, record.exception_type, record.exception_message),
        last_failed_at=failed_at,
    )
    from . import pg_fastpath

    if pg_fastpath.applicable(backend):
        history = list(record.history)
        letter_id = pg_fastpath.insert_new_letter(
            {"task_id": record.task_id, "history": history, "attempts": max(len(history), 1),
             "first_failed_at": failed_at, **values},
            record, backend, request,
        )
        if letter_id is not None:
            return letter_id
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(task_id=record.task_id).first()
        if letter is None:
            history = list(record.history)
            try:
                with transaction.atomic():
                    letter = DeadLetter.objects.create(
                        task_id=record.task_id,
                        history=history,
                        attempts=max(len(history), 1),
                        first_failed_at=failed_at,
                        **values,
                    )
            except IntegrityError:
                # Another worker parked the same task id a moment ago: merge into it.
                letter = DeadLetter.objects.select_for_update().get(task_id=record.task_id)
        if letter.history != record.history or letter.attempts == 0 or letter.status != values["status"]:
            history = _merge_history(letter.history, record)
            for name, value in values.items():
                setattr(letter, name, value)
            letter.history = history
            letter.attempts = max(len(history), 1)
            letter.save()
        if record.result is not None and backend is not None:
            _store_failure(backend, record, request)
    return letter.pk


def _store_failure(backend: Any, record: ParkRecord, request: Any) -> None:
    from celery import states

    backend.store_result(
        record.task_id,
        record.result["result"],
        states.FAILURE,
        traceback=record.result.get("traceback"),
        request=request,
    )


def drain_spool(backend: Any = None, limit: int | None = None) -> int:
    """Move spooled letters into the table; returns how many were written.

    Safe to call from every worker at once and from ``manage.py dlq drain``.
    """
    pending = spool()
    if not any(True for _ in pending.paths()):
        return 0

    def handle(data: dict) -> None:
        if deferred.is_deferred(data):  # a result, replay or saga write, not a letter
            deferred.apply(data, backend)
            return
        try:
            record = ParkRecord.from_dict(data)
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadRecord(f"not a dead-letter record: {exc}") from exc
        letter_id = _write(record, backend, None)
        escalation.on_parked(record, letter_id, report=False)

    try:
        drained = pending.drain(handle, limit=limit)
    except DatabaseError as exc:
        discard_broken_connections()
        logger.info("recovery: spool not drained yet, database still unavailable (%s)", exc)
        return 0
    if drained:
        logger.warning("recovery: drained %d spooled dead letter(s) into the database", drained)
    return drained
