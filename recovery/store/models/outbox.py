"""The transactional outbox's table: a task to publish if and only if a transaction commits.

``apply_async`` inside a transaction publishes either too early (before the commit, or
after a rollback) or, with ``on_commit``, not at all when the broker is down at that
moment. Writing the intent as a row in the caller's transaction and publishing it after
the commit (``recovery.workflows.outbox``) avoids both.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["OutboxMessage"]


class OutboxMessage(models.Model):
    """A task to publish once the transaction that wrote this row commits
    (``recovery.workflows.outbox``). Sent rows are kept ``OUTBOX_KEEP_SENT_HOURS`` for
    inspection."""

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255)
    signature = models.JSONField(help_text="The Celery signature to publish, as a dict.")
    not_before = models.DateTimeField(
        null=True, blank=True, help_text="Run no earlier than this (countdown/eta at enqueue).")
    created_at = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(
        default=timezone.now, help_text="When the relay may try to publish it (again).")
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="Publish attempts so far.")
    last_error = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        verbose_name = "outbox message"
        verbose_name_plural = "outbox messages"
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=["next_attempt_at"], name="recovery_outbox_pending",
                         condition=models.Q(sent_at__isnull=True)),
            models.Index(fields=["sent_at"], name="recovery_outbox_sent",
                         condition=models.Q(sent_at__isnull=False)),
        ]

    def __str__(self) -> str:
        state = f"sent {self.sent_at:%Y-%m-%d %H:%M:%S}" if self.sent_at else "pending"
        return f"{self.task_name}[{self.task_id}] {state}"
