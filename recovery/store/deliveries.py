"""Per-task delivery counts: the broker keeps none, so we keep them.

A delivery counts when it may have been lost: the delivery cap exists to stop a task
that kills its worker (or hits the hard time limit) every time. ``DeliveryCount.deliveries``
is how many deliveries of a task id counted; no row means one, the first.

* Each delivery of a message marked ``redelivered`` adds one, once, when the worker
  receives it (``count_redelivery``). The normal path (not redelivered) costs nothing.
* A message the worker hands back unused on a clean shutdown (prefetched, or waiting
  for its ETA) is marked ``redelivered`` by the broker too, yet nothing was lost: the
  worker takes that delivery back (``note_handed_back``), so a few deploys never add up
  to the cap.
* A replay starts the count again (``forget``): the letter's old deliveries were the
  ones that parked it.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from .models import DeliveryCount

__all__ = ["count_redelivery", "note_loss", "note_handed_back", "forget"]


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


def note_handed_back(task_ids: Iterable[str]) -> int:
    """The deliveries of ``task_ids`` now in hand go back to the broker unused: they do
    not count. Two statements whatever the number of ids; returns how many."""
    ids = sorted({task_id for task_id in task_ids if task_id})
    if not ids:
        return 0
    now = timezone.now()
    with transaction.atomic():
        # Never below zero: a hand-back whose receipt could not be counted (the database
        # was down) must not earn the task a spare delivery.
        DeliveryCount.objects.filter(task_id__in=ids).update(
            deliveries=Greatest(F("deliveries") - 1, Value(0)), updated_at=now)
        DeliveryCount.objects.bulk_create(
            [DeliveryCount(task_id=task_id, deliveries=0, updated_at=now) for task_id in ids],
            ignore_conflicts=True)
    return len(ids)


def forget(task_ids: Iterable[str]) -> None:
    """Start counting the deliveries of ``task_ids`` afresh (a replay publishes them again)."""
    ids = list(task_ids)
    if ids:
        DeliveryCount.objects.filter(task_id__in=ids).delete()
