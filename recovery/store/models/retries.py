"""The worker side's bookkeeping for runs still to come: retries too far off for the broker
to hold, and how often each task id was delivered.

``DueRetry`` exists because a long broker ETA is unsafe: Redis hands the delayed message
to a worker at once and, past the visibility timeout, to another one too; long delays
wait in this table instead and are published when due (``recovery.store.due``).
``DeliveryCount`` exists because the broker counts no redeliveries, so a task that kills
its worker every time would loop forever; the count lets it be parked past the cap
(``recovery.store.deliveries``).
"""

from __future__ import annotations

from django.db import models

__all__ = ["DueRetry", "DeliveryCount"]


class DueRetry(models.Model):
    """A retry whose delay is too long to hold safely as a broker ETA message.

    Workers publish rows that are due (``recovery.store.due``); ``signature`` is the
    Celery signature dict of the next attempt.
    """

    task_id = models.CharField(max_length=255, db_index=True)
    task_name = models.CharField(max_length=255)
    due_at = models.DateTimeField(db_index=True)
    signature = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "due retry"
        verbose_name_plural = "due retries"
        ordering = ("due_at",)

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] due {self.due_at:%Y-%m-%d %H:%M:%S}"


class DeliveryCount(models.Model):
    """How often a task id was redelivered (lost worker, hard time limit, restore).

    The broker keeps no count, so a task that kills its worker every time would
    loop forever; past ``RECOVERY["MAX_DELIVERIES"]`` it is parked instead.
    """

    task_id = models.CharField(max_length=255, primary_key=True)
    deliveries = models.PositiveIntegerField(default=1)
    last_failure = models.CharField(
        max_length=255, blank=True, default="",
        help_text="How the last delivery was lost (worker lost, hard time limit).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "delivery count"
        verbose_name_plural = "delivery counts"

    def __str__(self) -> str:
        return f"{self.task_id}: {self.deliveries}"
