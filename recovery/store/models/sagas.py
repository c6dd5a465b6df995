"""Saga runs, their steps and their audit trail: a multi-step workflow that survives worker
restarts and code changes.

A saga's progress must outlive any one worker and be resumable or compensable by an
operator, so it lives here rather than in messages: ``SagaRun`` is the run (with the
definition it started with), ``SagaStep`` one row per step or compensation dispatched,
``SagaEvent`` what operators and the watchdog did to it. ``recovery.workflows.sagas``
drives every transition.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["SagaRun", "SagaStep", "SagaEvent"]


class SagaRun(models.Model):
    """One run of a saga: where it is, what it carries, how it ended.

    The definition it started with is kept on the row, so changing a saga's code never
    changes the steps of a run already in flight; workers advance a run from this
    snapshot only.

    Status transitions (``recovery.workflows.sagas`` makes them all, under this row's lock):

        running      -> succeeded | compensating | held | failed
        compensating -> compensated | failed (nothing to undo) | needs_human
        held         -> running (resume) | compensating (compensate by hand)
        needs_human  -> compensating (compensate by hand, after the cause is fixed)
        failed       -> running (resume)
        succeeded    -> compensating (compensate by hand)
    """

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        COMPENSATING = "compensating", "Compensating"
        COMPENSATED = "compensated", "Compensated"
        SUCCEEDED = "succeeded", "Succeeded"
        HELD = "held", "Held for an operator"
        NEEDS_HUMAN = "needs_human", "Needs a human"
        FAILED = "failed", "Failed"

    name = models.CharField("saga", max_length=200, db_index=True)
    version = models.CharField(
        max_length=64,
        help_text="The definition's explicit version=, or a digest of its steps and options.",
    )
    definition = models.JSONField(
        help_text="The definition this run started with (steps, compensations, options); "
                  "the run continues with it even after the code changes.",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    context = models.JSONField(
        default=dict, blank=True,
        help_text="The start arguments merged with what each completed step returned.",
    )
    idempotency_key = models.CharField(
        "idempotency key", max_length=255, unique=True, null=True, blank=True,
        help_text="start(..., idempotency_key=) with a key already used returns that run.",
    )
    current_step = models.PositiveIntegerField(
        "current step", null=True, blank=True,
        help_text="Index of the step (or of the step being compensated) last dispatched.",
    )
    error = models.TextField(blank=True, default="", help_text="Why the run stopped, if it did.")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "saga run"
        verbose_name_plural = "saga runs"
        ordering = ("-created_at", "-id")
        permissions = [
            ("resume_sagarun", "Can resume saga runs from the failed step"),
            ("compensate_sagarun", "Can compensate saga runs"),
        ]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="recovery_saga_status"),
            models.Index(fields=["name", "-created_at"], name="recovery_saga_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} #{self.pk} {self.status}"


class SagaStep(models.Model):
    """A step of a run, or the compensation of one (``role``): one row each, with the task
    id it runs under, its timings and its error. Step rows are created with the run
    (pending); compensation rows when first dispatched."""

    class Role(models.TextChoices):
        STEP = "step", "Step"
        COMPENSATION = "compensation", "Compensation"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        SKIPPED = "skipped", "Skipped (optional step failed)"
        COMPENSATED = "compensated", "Compensated"

    run = models.ForeignKey(SagaRun, on_delete=models.CASCADE, related_name="steps")
    index = models.PositiveIntegerField(help_text="Position of the step in the definition, from 0.")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.STEP)
    task_name = models.CharField("task name", max_length=255)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    task_id = models.CharField(
        "task id", max_length=255, blank=True, default="", db_index=True,
        help_text="saga-<run>-<index>-step|compensation, with .<n> from the second dispatch.",
    )
    dispatches = models.PositiveIntegerField(
        default=0, help_text="Times it was dispatched: 1, plus one per resume or re-compensation.")
    attempts = models.PositiveIntegerField(
        default=0, help_text="Times a worker started it (retries and redeliveries included).")
    dispatched_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(
        null=True, blank=True, help_text="First start of the current dispatch.")
    finished_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "saga step"
        verbose_name_plural = "saga steps"
        ordering = ("run", "index", "-role")
        constraints = [
            models.UniqueConstraint(fields=["run", "index", "role"], name="recovery_saga_step_once"),
        ]
        indexes = [
            # recovery.workflows.sagas.reconcile: steps still running, oldest dispatch first
            models.Index(fields=["dispatched_at"], name="recovery_saga_step_running",
                         condition=models.Q(status="running")),
        ]

    def __str__(self) -> str:
        return f"{self.run_id}/{self.index} {self.role} {self.task_name} {self.status}"


class SagaEvent(models.Model):
    """An operator action on a run, or an escalation: the run's audit trail."""

    class Action(models.TextChoices):
        RESUMED = "resumed", "Resumed from the failed step"
        COMPENSATED = "compensated", "Compensation started by hand"
        ESCALATED = "escalated", "Escalated (needs a human)"
        REDISPATCHED = "redispatched", "Dispatched again by the watchdog"
        REVEALED = "revealed", "Secrets revealed"

    run = models.ForeignKey(SagaRun, on_delete=models.CASCADE, related_name="events")
    action = models.CharField(max_length=16, choices=Action.choices)
    actor = models.CharField(max_length=150, help_text="A username, cli:<user>, or system.")
    at = models.DateTimeField(default=timezone.now)
    note = models.TextField(blank=True, default="")
    outcome = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        verbose_name = "saga event"
        verbose_name_plural = "saga events"
        ordering = ("-at", "-pk")

    def __str__(self) -> str:
        return f"{self.action} by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}"
