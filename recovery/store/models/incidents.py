"""Incidents and their notifications: failures a human must look at, and who was told.

Escalation (``recovery.observe.escalation``) turns a critical failure, a crossed
threshold, a failed compensation or stuck work into one ``Incident`` per fingerprint
while it is open, so an on-call is paged once, not once per letter. Each message to a
channel is an ``IncidentNotification`` row, delivered by the workers with backoff
(``recovery.observe.notify``), so a slow channel never holds up parking.

An incident links the letters and the saga run it is about by the ``recovery`` app's
model names rather than by import, so this module depends on no other table's module.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["Incident", "IncidentNotification"]


class Incident(models.Model):
    """A problem a human must look at: one per failure fingerprint while it is open.

    ``recovery.observe.escalation`` opens it (a critical task parked, a fingerprint crossed
    its threshold, a compensation failed, the watchdog found stuck work) and notifies the
    channels once; later occurrences only link their letters and raise ``count``.

    Status transitions: open -> acknowledged -> resolved, or open -> resolved. A resolved
    incident stays closed: the next occurrence opens a new one.
    """

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        RESOLVED = "resolved", "Resolved"

    class Reason(models.TextChoices):
        CRITICAL_TASK = "critical_task", "A critical task failed for good"
        THRESHOLD = "threshold", "Too many dead letters of one failure"
        COMPENSATION_FAILED = "compensation_failed", "A compensation failed"
        STUCK_TASK = "stuck_task", "A task runs past its deadline"
        STUCK_SAGA_STEP = "stuck_saga_step", "A saga step runs past its timeout"
        STUCK_REPLAY = "stuck_replay", "Replayed letters never reported back"
        OUTBOX_STUCK = "outbox_stuck", "Outbox messages not sent"

    class Severity(models.TextChoices):
        CRITICAL = "critical", "Critical"
        ERROR = "error", "Error"
        WARNING = "warning", "Warning"

    fingerprint = models.CharField(
        max_length=64,
        help_text="What makes two occurrences the same incident: the letters' failure "
                  "fingerprint, or watchdog:<what>:<name>.",
    )
    reason = models.CharField(max_length=32, choices=Reason.choices)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.ERROR)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    title = models.CharField(max_length=255)
    task_name = models.CharField("task name", max_length=255, blank=True, default="")
    kind = models.CharField(max_length=32, blank=True, default="")
    queue = models.CharField(max_length=255, blank=True, default="")
    count = models.PositiveIntegerField(
        default=1, help_text="Occurrences since it opened (letters parked, checks that found it).")
    details = models.JSONField(
        default=dict, blank=True,
        help_text="Diagnostics of the latest occurrence as sent to the channels (secrets "
                  "masked): exception, traceback, arguments, history, classification, links.",
    )
    letters = models.ManyToManyField("recovery.DeadLetter", related_name="incidents", blank=True)
    saga_run = models.ForeignKey(
        "recovery.SagaRun", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="incidents")
    # db_default: rows written by raw SQL (bulk loads, benchmarks) need no value for it.
    rehearsal = models.CharField(
        max_length=32, blank=True, default="", db_default="",
        help_text="The rehearsal (manage.py rehearse) whose injected fault opened it, if any.")
    first_seen_at = models.DateTimeField("first seen", default=timezone.now)
    last_seen_at = models.DateTimeField("last seen", default=timezone.now)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True, default="")
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, default="")
    note = models.TextField(blank=True, default="", help_text="What the on-call found or did.")

    class Meta:
        verbose_name = "incident"
        verbose_name_plural = "incidents"
        ordering = ("-last_seen_at", "-id")
        permissions = [
            ("acknowledge_incident", "Can acknowledge incidents"),
            ("resolve_incident", "Can resolve incidents"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["fingerprint"], name="recovery_incident_one_open",
                condition=models.Q(status__in=["open", "acknowledged"]),
            ),
        ]
        indexes = [
            models.Index(fields=["status", "-last_seen_at"], name="recovery_incident_status"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title} ({self.status})"

    @property
    def is_open(self) -> bool:
        return self.status != self.Status.RESOLVED


class IncidentNotification(models.Model):
    """One message to one channel about one incident event: the delivery outbox.

    Unique per (incident, channel, event), so an incident is announced once however
    often its threshold is crossed; workers deliver pending rows with backoff.
    """

    class Channel(models.TextChoices):
        WEBHOOK = "webhook", "Webhook"
        EMAIL = "email", "E-mail to ADMINS"

    class Event(models.TextChoices):
        OPENED = "opened", "Opened"
        RESOLVED = "resolved", "Resolved"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Gave up"

    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="notifications")
    channel = models.CharField(max_length=16, choices=Channel.choices)
    event = models.CharField(max_length=16, choices=Event.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "incident notification"
        verbose_name_plural = "incident notifications"
        ordering = ("-created_at", "-id")
        constraints = [
            models.UniqueConstraint(fields=["incident", "channel", "event"],
                                    name="recovery_notification_once"),
        ]
        indexes = [
            models.Index(fields=["next_attempt_at"], name="recovery_notification_due",
                         condition=models.Q(status="pending")),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.event} for incident {self.incident_id}: {self.status}"
