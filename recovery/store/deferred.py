"""Bookkeeping writes that waited in the spool because the database was down.

A task whose body has returned has succeeded, whatever happens to our records of it
afterwards: its SUCCESS result, the resolution of the letter it was replayed from, the
completion of its saga step. When PostgreSQL refuses such a write (after one retry on a
fresh connection), the write is spooled here as a typed record, in the same durable
spool as dead letters, and the spool drain (every worker, ``manage.py dlq drain``)
applies it once the database is back. Letters carry no ``type`` field; every other
record names its type, and :func:`apply` dispatches on it to the applier its owner
registered (:func:`register`: the replay service and sagas register theirs), so the
store need not import its owners.

Each applier is idempotent and never overwrites a newer state: a drain may run twice
(two workers, a crash between apply and delete), and the task may have run again
meanwhile.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import datetime, timezone as dt_timezone
from pathlib import Path
from typing import Any

from celery import current_app, states
from celery.app.task import Context
from celery.utils.saferepr import saferepr
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from kombu.serialization import dumps, loads

from django.db import Error as DatabaseError

from .. import conf, events
from . import result_rows
from .connections import discard_broken_connections
from .spool import BadRecord, Spool
from ..core.names import logger_for

__all__ = ["RESULT", "REPLAY_SUCCEEDED", "SAGA_SUCCEEDED", "Applier", "register", "defer",
           "defer_result", "write_or_defer", "apply", "is_deferred"]

logger = logger_for(__name__)

RESULT = "result"
REPLAY_SUCCEEDED = "replay_succeeded"
SAGA_SUCCEEDED = "saga_succeeded"

# Request fields the result backends read for extended results (task name, argument reprs,
# worker, queue); the rest of a request is not needed to store a result. The raw arguments
# are not carried: the reprs stand for them, masked (recovery.store.result_rows), in the spool
# file and in the row.
_REQUEST_FIELDS = ("task", "argsrepr", "kwargsrepr", "hostname", "retries",
                   "periodic_task_name")


def is_deferred(data: dict) -> bool:
    """Whether a spool record is a deferred write (a letter has no ``type``)."""
    return isinstance(data, dict) and data.get("type", "letter") != "letter"


def defer(kind: str, **fields: Any) -> Path:
    """Spool one deferred write of type ``kind``. Raises OSError if the disk refuses."""
    record = {"type": kind, "at": timezone.now().isoformat(), **fields}
    path = Spool(conf.spool_dir()).put(record)
    events.bookkeeping_deferred.send(kind=kind)
    logger.warning("recovery: database unavailable; deferred %s write for %s to %s", kind,
                   fields.get("task_id"), path)
    return path


def write_or_defer(kind: str, write: Callable[[], Any], **fields: Any) -> DatabaseError | None:
    """Run ``write``; after a database error, once more on a fresh connection; then spool
    a ``kind`` record with ``fields`` for the drain to apply.

    Returns None when written now, or the database error that made the write wait in the
    spool (for the caller's log line).

    Raises:
        OSError: the spool refused too; its ``__cause__`` is the database error. The
            caller decides what a write that could be kept nowhere means (requeue the
            message, or log for a human).
    """
    for _ in range(2):
        try:
            write()
            return None
        except DatabaseError as exc:
            discard_broken_connections()
            error = exc
    try:
        defer(kind, **fields)
    except OSError as spool_error:
        raise spool_error from error
    return error


def defer_result(backend: Any, task_id: str, result: Any, request: Any = None) -> Path:
    """Spool a task's SUCCESS result, serialized as the backend would store it."""
    content_type, encoding, payload = dumps(result, serializer=backend.serializer)
    if isinstance(payload, bytes):
        payload = "base64:" + base64.b64encode(payload).decode("ascii")
    carried = {}
    for name in _REQUEST_FIELDS:
        value = getattr(request, name, None) if request is not None else None
        if value is not None:
            carried[name] = value
    carried.update(_masked_reprs(request))
    delivery = getattr(request, "delivery_info", None) or {}
    if delivery.get("routing_key"):
        carried["delivery_info"] = {"routing_key": delivery["routing_key"]}
    return defer(RESULT, task_id=task_id, state=states.SUCCESS, content_type=content_type,
                 content_encoding=encoding, payload=payload,
                 request=_json_safe(carried))


def _masked_reprs(request: Any) -> dict[str, str]:
    """The request's argument reprs with secrets masked; Celery's own when none is secret
    or the request has no arguments."""
    if request is None:
        return {}
    args, kwargs = getattr(request, "args", None), getattr(request, "kwargs", None)
    if args is None and kwargs is None:
        return {}
    reprs = result_rows.masked_reprs(getattr(request, "task", None) or "", args or [],
                                     kwargs or {}, extra_keys=result_rows.saga_keys(request))
    if reprs is None:
        if getattr(request, "argsrepr", None) is not None:
            return {}
        reprs = (saferepr(args or [], result_rows.REPR_MAX_CHARS),
                 saferepr(kwargs or {}, result_rows.REPR_MAX_CHARS))
    return {"argsrepr": reprs[0], "kwargsrepr": reprs[1]}


def apply(data: dict, backend: Any = None) -> None:
    """Apply one deferred write (the spool drain's handler for typed records).

    Raises:
        BadRecord: the record can never be applied (unknown type, missing fields).
        django.db.DatabaseError: the database is still down; the record stays spooled.
    """
    applier = _APPLIERS.get(data.get("type"))
    if applier is None:
        raise BadRecord(f"unknown deferred write type {data.get('type')!r}")
    try:
        applier(data, backend)
    except (KeyError, TypeError) as exc:
        raise BadRecord(f"malformed {data.get('type')} record: {exc!r}") from exc


def _apply_result(data: dict, backend: Any) -> None:
    backend = backend or current_app.backend
    task_id = data["task_id"]
    at = _parse_time(data["at"])
    # Uncached: a long-lived drain must see what other workers stored since. A run of the
    # same task finishing between this read and the store below is not excluded; the
    # window is one round trip, just after the database came back.
    meta = backend.get_task_meta(task_id, cache=False)
    status = meta.get("status")
    if status == states.SUCCESS:
        return  # already stored (an earlier drain, or a later run that succeeded too)
    stored_at = _parse_time(meta.get("date_done")) if meta.get("date_done") else None
    if status != states.PENDING and stored_at is not None and stored_at > at:
        logger.info("recovery: deferred result of %s not applied: the backend holds a newer "
                    "state (%s at %s)", task_id, status, stored_at)
        return
    payload = data["payload"]
    if isinstance(payload, str) and payload.startswith("base64:"):
        payload = base64.b64decode(payload[len("base64:"):])
    content_type = data["content_type"]
    result = loads(payload, content_type, data["content_encoding"], accept={content_type})
    request = Context(id=task_id, **data.get("request") or {})
    # A record spooled by an older release carries the raw arguments: mask them here.
    request.update(_masked_reprs(request))
    backend.store_result(task_id, result, states.SUCCESS, request=request)
    logger.warning("recovery: stored the deferred SUCCESS result of %s", task_id)


Applier = Callable[[dict, Any], None]
_APPLIERS: dict[str, Applier] = {RESULT: _apply_result}


def register(kind: str, applier: Applier) -> Applier:
    """Have the drain apply spooled ``kind`` records with ``applier(record, backend)``.

    :mod:`recovery.subscriptions` registers recovery's own when Django is ready, so every
    process that drains the spool has them all; the applier must be idempotent and raise ``DatabaseError`` while the database is still down.
    """
    _APPLIERS[kind] = applier
    return applier


def _parse_time(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else parse_datetime(str(value))
    if parsed is None:
        raise BadRecord(f"unreadable time {value!r}")
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=dt_timezone.utc)
    return parsed


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
