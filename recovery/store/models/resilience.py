"""What keeps work flowing while a dependency is failing: shared circuit and degraded-mode
state, and the record of every fallback taken.

``SharedState`` exists for deployments without Redis: circuit breakers and degraded-mode
switches must read the same on every worker, and the database is the place they all
share (``recovery.workflows.shared_state``). ``FallbackUse`` exists because a fallback's
result hides the failure from the caller: each degraded answer is recorded where
operators can see it.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["SharedState", "FallbackUse"]


class SharedState(models.Model):
    """Small shared records (circuit breakers, degraded-mode switches) when they are kept in
    the database rather than Redis: the embedded default, or ``SHARED_STATE_URL="database"``."""

    key = models.CharField(max_length=255, primary_key=True)
    value = models.JSONField(default=dict)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "shared state"
        verbose_name_plural = "shared state"

    def __str__(self) -> str:
        return self.key


class FallbackUse(models.Model):
    """A task that gave up (or met an open circuit or a degraded mode) and returned its
    fallback's result instead: the degradation, recorded where operators can see it."""

    class Reason(models.TextChoices):
        GAVE_UP = "gave_up", "Policy gave up"
        CIRCUIT_OPEN = "circuit_open", "Circuit open"
        DEGRADED = "degraded", "Degraded mode"

    task_id = models.CharField(max_length=255, db_index=True)
    task_name = models.CharField(max_length=255)
    fallback = models.CharField(max_length=255)
    reason = models.CharField(max_length=16, choices=Reason.choices)
    dependency = models.CharField(max_length=255, blank=True, default="")
    exception_type = models.CharField(max_length=255, blank=True, default="")
    exception_message = models.TextField(blank=True, default="")
    at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name = "fallback use"
        verbose_name_plural = "fallback uses"
        ordering = ("-at",)

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] -> {self.fallback} ({self.reason})"
