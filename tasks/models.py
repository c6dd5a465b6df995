"""Stand-ins for the external services the order saga talks to (``tasks.standins``).

They keep what they did in the database so the demo and the tests can count effects:
a real inventory, payment or shipping service would be on the other side of an HTTP
call, with its own idempotency keys.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["ServiceEffect", "ServiceCall", "ServiceFault", "Customer"]


class ServiceEffect(models.Model):
    """What a stand-in service did: once per (service, action, idempotency key), however
    often it was asked."""

    service = models.CharField(max_length=32)
    action = models.CharField(max_length=32)
    key = models.CharField("idempotency key", max_length=255)
    detail = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("at", "pk")
        constraints = [
            models.UniqueConstraint(fields=["service", "action", "key"],
                                    name="tasks_effect_once_per_key"),
        ]

    def __str__(self) -> str:
        return f"{self.service}.{self.action}[{self.key}]"


class ServiceCall(models.Model):
    """Every request a stand-in received, effect or not: retries, redeliveries, and which
    worker process made it."""

    class Outcome(models.TextChoices):
        APPLIED = "applied", "Applied"
        ALREADY = "already", "Already applied (idempotent repeat)"
        REFUSED = "refused", "Refused (fault)"

    service = models.CharField(max_length=32)
    action = models.CharField(max_length=32)
    key = models.CharField("idempotency key", max_length=255)
    pid = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("at", "pk")

    def __str__(self) -> str:
        return f"{self.service}.{self.action}[{self.key}] {self.outcome} (pid {self.pid})"


class ServiceFault(models.Model):
    """How a stand-in misbehaves until the row is deleted: the demo's and the tests' lever.

    ``refuse``: every call fails for good, before any effect (a declined card, a carrier
    that rejects the address). ``hang_after_effect``: the first call for a key applies its
    effect and then hangs for ``seconds`` (a worker killed there must not repeat the effect
    when the step runs again).
    """

    class Mode(models.TextChoices):
        REFUSE = "refuse", "Refuse every call"
        HANG_AFTER_EFFECT = "hang_after_effect", "Hang after the first effect"

    service = models.CharField(max_length=32)
    action = models.CharField(max_length=32)
    mode = models.CharField(max_length=24, choices=Mode.choices)
    seconds = models.FloatField(default=30.0)
    message = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["service", "action"],
                                    name="tasks_one_fault_per_action"),
        ]

    def __str__(self) -> str:
        return f"{self.service}.{self.action}: {self.mode}"


class Customer(models.Model):
    """A customer written by the import example (``tasks.tasks.import_customer_row``): once
    per imported row, however often the import task runs (``self.effect``)."""

    external_id = models.CharField(max_length=64)
    email = models.EmailField()
    imported_by = models.CharField("task id", max_length=255)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("at", "pk")

    def __str__(self) -> str:
        return f"customer {self.external_id} <{self.email}>"
