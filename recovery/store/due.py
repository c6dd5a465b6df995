"""The due-table: long retry delays wait in the database, not in worker memory.

A Redis broker hands a delayed (ETA) message to a worker at once and the
worker holds it until it is due; past the visibility timeout Redis gives it
to another worker too, so it runs twice (celery#2599, kombu#337). Holding
long delays here and publishing them when due keeps every retry single and
leaves nothing stranded when a worker dies. Every worker polls; row locks
with SKIP LOCKED make each row published by exactly one of them.

A row is deleted in the transaction that claimed it, right after its publish,
and a batch holds a few rows: when the broker fails at row k, rows before it are
deleted with the commit and row k waits for the next tick, so nothing is
published twice. Only a database that fails between a publish and the commit
can send a batch again (at least once, never lost). A row that can never be
published (anything but the broker being unreachable) is parked as a poison
dead letter, so it cannot hold up the rows behind it.
"""

from __future__ import annotations

import json
from datetime import datetime

from celery import current_app
from celery import signature as make_signature
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from ..core import headers as hdr
from ..core.kinds import FailureKind
from .models import DueRetry
from .parking import ParkRecord, letter_task_id, park
from ..core.names import logger_for

__all__ = ["hold", "publish_due"]

logger = logger_for(__name__)

#: Rows claimed per transaction: at most this many are sent again if the database fails
#: between their publish and the commit.
BATCH_ROWS = 20


def hold(signature, due_at: datetime) -> DueRetry:
    data = dict(signature)
    options = dict(data.get("options") or {})
    for key in ("countdown", "eta"):
        options.pop(key, None)
    data["options"] = options
    # The row's ids only describe it (the signature carries the real ones): cut to their
    # columns, so a client's 300-character task id still waits here, not as an ETA message.
    return DueRetry.objects.create(
        task_id=letter_task_id(options.get("task_id") or ""),
        task_name=str(data.get("task") or "")[:DueRetry._meta.get_field("task_name").max_length],
        due_at=due_at,
        signature=data,
    )


def publish_due(app=None, limit: int = 200, now: datetime | None = None) -> int:
    """Publish the retries that are due, at most ``limit``; returns how many were sent.

    Stops at the first publish the broker refuses; that row and the ones after it wait
    for the next tick, and the ones before it are never sent again.
    """
    now = now or timezone.now()
    sent = taken = 0
    while taken < limit:
        size = min(BATCH_ROWS, limit - taken)
        claimed, published, broker_down = _publish_batch(app, size, now)
        taken += claimed
        sent += published
        if broker_down or claimed < size:
            break
    if sent:
        logger.info("recovery: published %d due retr%s", sent, "y" if sent == 1 else "ies")
    return sent


def _publish_batch(app, size: int, now: datetime) -> tuple[int, int, bool]:
    """Claim up to ``size`` due rows, publish them in order, delete what was published
    (or parked); returns (claimed, published, whether the broker failed)."""
    done: list[int] = []
    published = 0
    broker_down = False
    with transaction.atomic():
        rows = list(
            DueRetry.objects.select_for_update(skip_locked=True)
            .filter(due_at__lte=now)
            .order_by("due_at")[:size]
        )
        for row in rows:
            try:
                make_signature(row.signature, app=app).apply_async()
            except Exception as exc:  # noqa: BLE001 - classified below
                if _broker_unreachable(exc, app):
                    logger.warning("recovery: could not publish due retry %s[%s] (%s); it and "
                                   "the rows after it wait for the next tick",
                                   row.task_name, row.task_id, exc)
                    broker_down = True
                    break
                _park_unpublishable(row, exc)
            else:
                published += 1
            done.append(row.pk)
        if done:
            DueRetry.objects.filter(pk__in=done).delete()
    return len(rows), published, broker_down


def _broker_unreachable(exc: BaseException, app) -> bool:
    if isinstance(exc, (BrokerError, OSError)):
        return True
    connection = (app or current_app).connection_for_write()
    try:
        return isinstance(exc, connection.connection_errors + connection.channel_errors)
    finally:
        connection.release()


def _park_unpublishable(row: DueRetry, exc: BaseException) -> None:
    """Park a retry that can never be published (a signature that cannot be built or
    encoded): as a dead letter it is counted, alerted on and replayable, and the rows
    behind it flow on."""
    data = row.signature if isinstance(row.signature, dict) else {}
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    history = hdr.from_options(options, hdr.HISTORY)
    args, kwargs = data.get("args"), data.get("kwargs")
    logger.error("recovery: due retry %s[%s] cannot be published (%s); parking it",
                 row.task_name, row.task_id, exc)
    park(ParkRecord(
        task_id=row.task_id or f"due-retry-{row.pk}",
        task_name=row.task_name or str(data.get("task") or "<unknown>"),
        kind=FailureKind.POISON.value,
        permanent=True,
        reason="its due retry could not be published",
        exception_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        exception_message=str(exc),
        args=list(args) if isinstance(args, (list, tuple)) else [],
        kwargs=kwargs if isinstance(kwargs, dict) else {},
        # the whole signature as it was, whatever in it could not be used
        raw_body=json.dumps(row.signature, default=str),
        content_type="application/json",
        headers={k: v for k, v in options.items() if k != "task_id"},
        history=history if isinstance(history, list) else [],
        replay=int(hdr.from_options(options, hdr.REPLAY) or 0),
    ))
