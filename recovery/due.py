"""The due-table: long retry delays wait in the database, not in worker memory.

A Redis broker hands a delayed (ETA) message to a worker at once and the
worker holds it until it is due; past the visibility timeout Redis gives it
to another worker too, so it runs twice (celery#2599, kombu#337). Holding
long delays here and publishing them when due keeps every retry single and
leaves nothing stranded when a worker dies. Every worker polls; row locks
with SKIP LOCKED make each row published by exactly one of them.
"""

from __future__ import annotations

import logging
from datetime import datetime

from celery import signature as make_signature
from django.db import transaction
from django.utils import timezone

from .models import DueRetry

__all__ = ["hold", "publish_due"]

logger = logging.getLogger(__name__)


def hold(signature, due_at: datetime) -> DueRetry:
    data = dict(signature)
    options = dict(data.get("options") or {})
    for key in ("countdown", "eta"):
        options.pop(key, None)
    data["options"] = options
    return DueRetry.objects.create(
        task_id=options.get("task_id") or "",
        task_name=data.get("task") or "",
        due_at=due_at,
        signature=data,
    )


def publish_due(app=None, limit: int = 200, now: datetime | None = None) -> int:
    """Publish the retries that are due; returns how many were sent.

    A row is deleted in the same transaction that published it; if the commit fails
    after the publish, the retry may be sent twice (at least once, never lost).
    """
    now = now or timezone.now()
    sent = 0
    with transaction.atomic():
        rows = list(
            DueRetry.objects.select_for_update(skip_locked=True)
            .filter(due_at__lte=now)
            .order_by("due_at")[:limit]
        )
        for row in rows:
            sig = make_signature(row.signature, app=app)
            sig.apply_async()
            sent += 1
        if rows:
            DueRetry.objects.filter(pk__in=[row.pk for row in rows]).delete()
    if sent:
        logger.info("recovery: published %d due retr%s", sent, "y" if sent == 1 else "ies")
    return sent
