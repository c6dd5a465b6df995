"""Durable state of the recovery runtime: dead letters, the retry due-table and
per-task delivery counts.

Dead-letter status transitions (anything else is a bug):

    parked     -> replaying | resolved | discarded | compensated
    replaying  -> resolved (the replayed run succeeded) | parked (it failed for good, or
                  its publish failed)
    compensated -> parked (the compensation could not be published)
    resolved, discarded, compensated -> parked (only when the same task id fails again)

A task id has at most one letter: parking is an upsert on ``task_id`` and a
replay reuses the row.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["DeadLetter", "DueRetry", "DeliveryCount", "DeadLetterEvent", "OutboxMessage"]


class DeadLetter(models.Model):
    class Status(models.TextChoices):
        PARKED = "parked", "Parked"
        REPLAYING = "replaying", "Replaying"
        RESOLVED = "resolved", "Resolved"
        DISCARDED = "discarded", "Discarded"
        COMPENSATED = "compensated", "Compensated"

    class Kind(models.TextChoices):
        DEPENDENCY = "dependency", "External dependency"
        DATA_INTEGRITY = "data_integrity", "Data integrity"
        RESOURCE_EXHAUSTED = "resource_exhausted", "Resource exhausted"
        TIMEOUT = "timeout", "Timeout or deadlock"
        POISON = "poison", "Poison message"
        OTHER = "other", "Other"

    task_id = models.CharField(
        "task id", max_length=255, unique=True,
        help_text="Celery task id; poison messages without one get poison-<sha256 of body>.",
    )
    task_name = models.CharField("task name", max_length=255, db_index=True)
    args = models.JSONField("positional arguments", default=list, blank=True)
    kwargs = models.JSONField("keyword arguments", default=dict, blank=True)
    headers = models.JSONField(
        "execution options", default=dict, blank=True,
        help_text="What a replay needs to continue the workflow: chain, link, chord, "
                  "group, root/parent ids and custom headers.",
    )
    raw_body = models.TextField(
        "raw body", blank=True, default="",
        help_text="The undecoded message body of a poison message (base64: prefix if binary).",
    )
    content_type = models.CharField(max_length=128, blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PARKED)
    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.OTHER)
    permanent = models.BooleanField(
        default=False, help_text="Whether the classifier judged the last failure permanent.",
    )
    reason = models.CharField(
        max_length=255, blank=True, default="",
        help_text="Why it was parked: the classification and the policy's verdict.",
    )
    exception_type = models.CharField("exception type", max_length=255, blank=True, default="")
    exception_message = models.TextField("exception message", blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(
        default=0, help_text="Runs that failed, cumulative across replays.",
    )
    replay_count = models.PositiveIntegerField("replays", default=0)
    history = models.JSONField(
        default=list, blank=True,
        help_text="One entry per failed attempt: at, attempt, replay (0 for the original "
                  "run), kind, exception_type, exception_message, delay_seconds (the delay "
                  "chosen before the next attempt, or null).",
    )
    queue = models.CharField("origin queue", max_length=255, blank=True, default="")
    worker = models.CharField(max_length=255, blank=True, default="")
    fingerprint = models.CharField(
        max_length=40, db_index=True,
        help_text="Groups the same failure on different data (see recovery.fingerprint).",
    )
    first_failed_at = models.DateTimeField("first failed", default=timezone.now)
    last_failed_at = models.DateTimeField("last failed", default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "dead letter"
        verbose_name_plural = "dead letters"
        ordering = ("-last_failed_at",)
        permissions = [
            ("replay_deadletter", "Can replay dead letters"),
            ("discard_deadletter", "Can discard dead letters"),
            ("resolve_deadletter", "Can mark dead letters resolved"),
            ("compensate_deadletter", "Can compensate dead letters"),
            ("reveal_deadletter_secrets", "Can reveal secrets in dead letters"),
        ]
        indexes = [
            models.Index(fields=["status", "-last_failed_at"], name="recovery_dl_status_last"),
            models.Index(fields=["kind", "-last_failed_at"], name="recovery_dl_kind_last"),
            models.Index(fields=["task_name", "-last_failed_at"], name="recovery_dl_task_last"),
            # The admin's default order (Meta.ordering plus its -pk tie-break), date ranges
            # and date_hierarchy's first/next date: without it, a full sort at 1M rows.
            models.Index(fields=["-last_failed_at", "-id"], name="recovery_dl_last_failed"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.status}"


class DueRetry(models.Model):
    """A retry whose delay is too long to hold safely as a broker ETA message.

    Workers publish rows that are due (``recovery.due``); ``signature`` is the
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


class DeadLetterEvent(models.Model):
    """One operator action on a letter: the audit trail. Never edited or deleted."""

    class Action(models.TextChoices):
        REPLAYED = "replayed", "Replayed"
        REPLAY_FAILED = "replay_failed", "Replay could not be published"
        EDITED = "edited", "Payload edited"
        DISCARDED = "discarded", "Discarded"
        RESOLVED = "resolved", "Resolved by hand"
        COMPENSATED = "compensated", "Compensation started"
        COMPENSATE_FAILED = "compensate_failed", "Compensation could not be published"

    letter = models.ForeignKey(DeadLetter, on_delete=models.CASCADE, related_name="events")
    action = models.CharField(max_length=32, choices=Action.choices)
    actor = models.CharField(max_length=150, help_text="Who acted: a username, or cli:<user>.")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    note = models.TextField(blank=True, default="")
    before = models.JSONField(null=True, blank=True, help_text="The payload before an edit.")
    after = models.JSONField(null=True, blank=True, help_text="The payload after an edit.")
    outcome = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        verbose_name = "dead-letter event"
        verbose_name_plural = "dead-letter events"
        ordering = ("-at", "-pk")

    def __str__(self) -> str:
        return f"{self.action} by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}"


class OutboxMessage(models.Model):
    """A task to publish once the transaction that wrote this row commits
    (``recovery.outbox``). Sent rows are kept ``OUTBOX_KEEP_SENT_HOURS`` for inspection."""

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
