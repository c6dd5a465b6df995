"""Dead letters and their audit trail: the tasks that failed for good, and what operators
did about them.

A task its policy gives up on (or a message that cannot even be decoded) is parked as a
``DeadLetter`` rather than lost, so an operator can inspect, edit, replay, discard,
resolve or compensate it; each of those actions is a ``DeadLetterEvent``, kept as the
audit trail and never edited.

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

from ...core.deepjson import DeepJSONField

__all__ = ["DeadLetter", "DeadLetterEvent"]


class DeadLetter(models.Model):
    """A task that failed for good, or a message that could not be decoded, kept for an
    operator: one row per task id, reused by every replay."""

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
    args = DeepJSONField("positional arguments", default=list, blank=True)
    kwargs = DeepJSONField("keyword arguments", default=dict, blank=True)
    headers = DeepJSONField(
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
    history = DeepJSONField(
        default=list, blank=True,
        help_text="One entry per failed attempt: at, attempt, replay (0 for the original "
                  "run), kind, exception_type, exception_message, delay_seconds (the delay "
                  "chosen before the next attempt, or null).",
    )
    queue = models.CharField("origin queue", max_length=255, blank=True, default="")
    worker = models.CharField(max_length=255, blank=True, default="")
    fingerprint = models.CharField(
        max_length=40,
        help_text="Groups the same failure on different data (see recovery.fingerprint).",
    )
    # db_default: rows written by raw SQL (bulk loads, benchmarks) need no value for it.
    rehearsal = models.CharField(
        max_length=32, blank=True, default="", db_default="",
        help_text="The rehearsal (manage.py rehearse) whose injected fault parked it, if any.")
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
            # Escalation's "N letters of one fingerprint in M minutes" and the failure
            # groups; it replaces the plain fingerprint index (same prefix).
            models.Index(fields=["fingerprint", "-last_failed_at"], name="recovery_dl_fp_last"),
            # The backlog a metrics scrape counts (recovery.observe.metrics.DatabaseCollector):
            # as small as the open letters, however many closed ones the table keeps.
            models.Index(fields=["status", "last_failed_at"], name="recovery_dl_open",
                         condition=models.Q(status__in=["parked", "replaying"])),
            # A rehearsal's report and purge: as small as the rehearsed letters.
            models.Index(fields=["rehearsal"], name="recovery_dl_rehearsal",
                         condition=~models.Q(rehearsal="")),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.status}"


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
        REPLAY_LOST = "replay_lost", "Replay never reported back"
        REVEALED = "revealed", "Secrets revealed"
        IMPORTED = "imported", "Imported from an export"
        EFFECTS_RERUN = "effects_rerun", "Effects set to run again"

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
