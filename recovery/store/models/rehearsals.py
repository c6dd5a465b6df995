"""Failure rehearsals: a fault injected on purpose into matching tasks, for a while, in a
non-production environment, and the audit trail of who started and stopped it.

A rehearsal proves before production does that a permanent failure of a dependency is
retried, parked, escalated and replayable (see ``recovery.workflows.rehearsals`` and
docs/rehearsals.md). Every letter and incident it causes carries its id in their
``rehearsal`` field, so that its report and its purge find them, and nobody mistakes them
for real failures.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["Rehearsal", "RehearsalEvent", "RehearsalInjection"]


class Rehearsal(models.Model):
    """One fault-injection switch: which tasks, which fault, how often, until when."""

    class Fault(models.TextChoices):
        PERMANENT = "permanent", "Permanent failure"
        TRANSIENT = "transient", "Transient failure"
        TIMEOUT = "timeout", "Time limit exceeded"
        HANG = "hang", "Hang until the time limit (or the rehearsal's end)"
        KILL = "kill", "Kill the process running the task"

    task = models.CharField(
        max_length=255,
        help_text="A task name, or a shell-style pattern (shop.tasks.*) of task names.")
    fault = models.CharField(max_length=16, choices=Fault.choices)
    rate = models.FloatField(help_text="The probability that a matching run is hit, 0 < rate <= 1.")
    kind = models.CharField(max_length=32, default="dependency",
                            help_text="The failure kind the injected error is classified as.")
    message = models.CharField(max_length=255, blank=True, default="")
    started_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(help_text="It stops by itself then (24 hours at most).")
    stopped_at = models.DateTimeField(null=True, blank=True)
    started_by = models.CharField(max_length=150)
    stopped_by = models.CharField(max_length=150, blank=True, default="")

    class Meta:
        verbose_name = "rehearsal"
        verbose_name_plural = "rehearsals"
        ordering = ("-started_at", "-id")
        permissions = [("run_rehearsal", "Can start and stop failure rehearsals")]

    def __str__(self) -> str:
        return f"rehearsal {self.pk}: {self.fault} into {self.task} at {self.rate:g}"

    def is_running(self, now=None) -> bool:
        return self.stopped_at is None and self.expires_at > (now or timezone.now())

    @property
    def ended_at(self):
        """When it stopped, or expires (or expired)."""
        return self.stopped_at or self.expires_at


class RehearsalEvent(models.Model):
    """Starting, stopping and purging a rehearsal: the audit trail. Never edited."""

    class Action(models.TextChoices):
        STARTED = "started", "Started"
        STOPPED = "stopped", "Stopped"
        PURGED = "purged", "Letters purged"

    rehearsal = models.ForeignKey(Rehearsal, on_delete=models.CASCADE, related_name="events")
    action = models.CharField(max_length=16, choices=Action.choices)
    actor = models.CharField(max_length=150, help_text="A username, or cli:<user>.")
    at = models.DateTimeField(default=timezone.now)
    note = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "rehearsal event"
        verbose_name_plural = "rehearsal events"
        ordering = ("-at", "-pk")

    def __str__(self) -> str:
        return f"{self.action} by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}"


class RehearsalInjection(models.Model):
    """A run that was hit: what its report follows to the letter, the incident, the replay."""

    rehearsal = models.ForeignKey(Rehearsal, on_delete=models.CASCADE, related_name="injections")
    task_id = models.CharField(max_length=255)
    task_name = models.CharField(max_length=255)
    fault = models.CharField(max_length=16)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "rehearsal injection"
        verbose_name_plural = "rehearsal injections"
        ordering = ("at", "pk")
        indexes = [models.Index(fields=["task_id"], name="recovery_rh_inj_task")]
