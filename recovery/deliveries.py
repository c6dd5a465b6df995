"""Per-task delivery counts: the broker keeps none, so we keep them.

Counted only when a message arrives marked ``redelivered`` (kombu sets it on a
restored or requeued message), so the normal path costs nothing.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import F

from .models import DeliveryCount

__all__ = ["count_redelivery", "note_loss"]


def count_redelivery(task_id: str) -> tuple[int, str]:
    """Record one more delivery of ``task_id``; returns (deliveries so far, last loss)."""
    with transaction.atomic():
        updated = DeliveryCount.objects.filter(task_id=task_id).update(deliveries=F("deliveries") + 1)
        if not updated:
            try:
                with transaction.atomic():
                    DeliveryCount.objects.create(task_id=task_id, deliveries=2)
            except IntegrityError:
                DeliveryCount.objects.filter(task_id=task_id).update(deliveries=F("deliveries") + 1)
        row = DeliveryCount.objects.get(task_id=task_id)
    return row.deliveries, row.last_failure


def note_loss(task_id: str, description: str) -> None:
    """Remember why the last delivery of ``task_id`` was lost (shown when it is parked)."""
    updated = DeliveryCount.objects.filter(task_id=task_id).update(last_failure=description[:255])
    if not updated:
        try:
            with transaction.atomic():
                DeliveryCount.objects.create(task_id=task_id, deliveries=1, last_failure=description[:255])
        except IntegrityError:
            DeliveryCount.objects.filter(task_id=task_id).update(last_failure=description[:255])
