"""A transactional outbox: publish a task if and only if the transaction commits.

``apply_async`` inside ``transaction.atomic()`` is wrong both ways: published
before the commit, the task may run on data that is not there yet (or never
will be, after a rollback); published after it with ``on_commit``, it is lost
when the broker is down at that moment (celery#3957, celery#8976). Here the
intent is a row written in the caller's transaction; after the commit it is
published at once, and if that fails a relay on every worker
(``Housekeeping``) publishes it when the broker is back. A rollback removes
the row, so nothing is ever published for it.

Delivery is at least once: a crash between the publish and marking the row
sent publishes it again, under the same task id. Tasks enqueued here should
be idempotent (``RecoveryTask`` tasks run under the id fixed at enqueue time).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from typing import Any

from celery import current_app
from celery import signature as make_signature
from celery.canvas import Signature
from celery.result import AsyncResult
from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import F
from django.utils import timezone

from .. import conf
from ..core.brokers import broker_delay
from ..store.models import OutboxMessage
from ..core.names import logger_for

__all__ = ["enqueue", "relay", "pending_count"]

logger = logger_for(__name__)

#: per-call options that describe *when* to run, which the relay re-derives
_TIMING = ("countdown", "eta")


def enqueue(task: Any, args: Any = None, kwargs: Any = None, *, using: str = DEFAULT_DB_ALIAS,
            app: Any = None, **options: Any) -> AsyncResult:
    """Publish ``task(*args, **kwargs)`` when the current transaction commits.

    ``task`` is a task, a task name or a signature; ``options`` are ``apply_async``'s
    (``queue``, ``headers``, ``priority``, ``countdown`` ...) and must be JSON-serialisable.
    Outside ``transaction.atomic()`` the row commits at once and is published at once.

    Returns:
        The result of the task id the task will run under, known before it is published.
    """
    app = app or current_app
    if isinstance(task, Signature):
        signature = task
    else:
        signature = app.signature(task if isinstance(task, str) else task.name)
    signature = signature.clone(args=tuple(args or ()), kwargs=dict(kwargs or {}))
    signature.options.update(options)
    task_id = signature.options.pop("task_id", None) or str(uuid.uuid4())
    delay = signature.options.pop("countdown", None)
    eta = signature.options.pop("eta", None)
    not_before = timezone.now() + timedelta(seconds=float(delay)) if delay else eta
    row = OutboxMessage.objects.using(using).create(
        task_id=task_id, task_name=signature.task, signature=dict(signature),
        not_before=not_before,
    )
    transaction.on_commit(partial(_publish_after_commit, row.pk, using, app), using=using,
                          robust=True)
    return AsyncResult(task_id, app=app)


@contextmanager
def _broker(app: Any) -> Iterator[Any]:
    """A pooled broker connection that fails fast: a down broker must not hold a web
    request (or the relay) in kombu's reconnect loop; the relay's backoff retries."""
    with app.pool.acquire(block=True) as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                                   interval_max=0.2)
            yield conn
        except Exception:
            conn.collect()  # reconnect from scratch next time
            raise


def _publish_after_commit(pk: int, using: str, app: Any) -> None:
    """The fast path: right after the commit, in the committing process."""
    try:
        with transaction.atomic(using=using):
            row = (OutboxMessage.objects.using(using).select_for_update(skip_locked=True)
                   .filter(pk=pk, sent_at__isnull=True).first())
            if row is not None:
                try:
                    with _broker(app) as conn:
                        _publish(row, app, using, conn)
                except Exception as exc:  # noqa: BLE001 - could not even connect
                    _failed(row, exc, using)
    except Exception:  # noqa: BLE001 - the relay publishes it later; never fail the caller
        logger.warning("recovery: outbox row %s not published after commit; the relay will "
                       "retry", pk, exc_info=True)


def _failed(row: OutboxMessage, exc: BaseException, using: str) -> None:
    backoff = min(float(conf.get("OUTBOX_MAX_BACKOFF_SECONDS")), 2.0 ** row.attempts)
    OutboxMessage.objects.using(using).filter(pk=row.pk).update(
        attempts=F("attempts") + 1, last_error=f"{type(exc).__name__}: {exc}"[:255],
        next_attempt_at=timezone.now() + timedelta(seconds=backoff),
    )


def _publish(row: OutboxMessage, app: Any, using: str, connection: Any) -> bool:
    """With the row locked: publish it and mark it sent, or record why not."""
    options: dict[str, Any] = {"task_id": row.task_id, "retry": False, "connection": connection}
    wait = (row.not_before - timezone.now()).total_seconds() if row.not_before else 0.0
    if wait > 0:
        # As a countdown, rounded to what the broker can carry (RabbitMQ: whole seconds).
        options["countdown"] = broker_delay(app, wait)
    try:
        make_signature(row.signature, app=app).apply_async(**options)
    except Exception as exc:  # noqa: BLE001 - the broker is down or refused it
        _failed(row, exc, using)
        connection.collect()
        return False
    OutboxMessage.objects.using(using).filter(pk=row.pk).update(
        sent_at=timezone.now(), attempts=F("attempts") + 1, last_error="")
    return True


def relay(app: Any = None, limit: int = 200, using: str = DEFAULT_DB_ALIAS) -> int:
    """Publish committed intents the fast path could not; returns how many were sent.

    Every worker runs it; ``SKIP LOCKED`` gives each row to one of them. Stops at the
    first publish failure (the broker is down: the rest would fail too), and forgets
    rows sent more than ``OUTBOX_KEEP_SENT_HOURS`` ago.
    """
    app = app or current_app
    sent = 0
    with transaction.atomic(using=using):
        rows = list(
            OutboxMessage.objects.using(using).select_for_update(skip_locked=True)
            .filter(sent_at__isnull=True, next_attempt_at__lte=timezone.now())
            .order_by("next_attempt_at", "pk")[:limit]
        )
        if rows:
            try:
                with _broker(app) as conn:
                    for row in rows:
                        if not _publish(row, app, using, conn):
                            logger.warning("recovery: outbox relay could not publish %s[%s]; "
                                           "retrying later", row.task_name, row.task_id)
                            break
                        sent += 1
            except Exception as exc:  # noqa: BLE001 - the broker is unreachable
                logger.warning("recovery: outbox relay cannot reach the broker (%s); %d "
                               "intent(s) wait", exc, len(rows))
                _failed(rows[0], exc, using)
    if sent:
        logger.info("recovery: outbox relay published %d task%s", sent, "" if sent == 1 else "s")
    keep = timezone.now() - timedelta(hours=float(conf.get("OUTBOX_KEEP_SENT_HOURS")))
    stale = list(OutboxMessage.objects.using(using)
                 .filter(sent_at__lt=keep).values_list("pk", flat=True)[:1000])
    if stale:
        OutboxMessage.objects.using(using).filter(pk__in=stale).delete()
    return sent


def pending_count(using: str = DEFAULT_DB_ALIAS) -> int:
    """Committed intents not yet published (the outbox backlog)."""
    return OutboxMessage.objects.using(using).filter(sent_at__isnull=True).count()
