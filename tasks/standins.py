"""Tiny local stand-ins for an inventory, a payment and a shipping service.

``perform()`` is what a client library call would be: it applies an effect at most once
per idempotency key (as a real service honouring an ``Idempotency-Key`` header does), and
fails or hangs as a ``ServiceFault`` row says, so the demo and the tests control failures
from outside the worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from recovery import DependencyError

from .models import ServiceCall, ServiceEffect, ServiceFault

__all__ = ["perform", "set_fault", "clear_faults", "effects"]


def perform(service: str, action: str, key: str, detail: dict[str, Any] | None = None) -> dict:
    """Apply ``service.action`` once for ``key``; returns the effect's detail.

    Raises:
        DependencyError: permanent, when a ``refuse`` fault is set (no effect applied).
    """
    if not key:
        raise ValueError(f"{service}.{action} needs an idempotency key")
    fault = ServiceFault.objects.filter(service=service, action=action).first()
    if fault is not None and fault.mode == ServiceFault.Mode.REFUSE:
        ServiceCall.objects.create(service=service, action=action, key=key, pid=os.getpid(),
                                   outcome=ServiceCall.Outcome.REFUSED)
        raise DependencyError(fault.message or f"{service} refused {action} for {key}",
                              permanent=True)
    effect, created = ServiceEffect.objects.get_or_create(
        service=service, action=action, key=key, defaults={"detail": detail or {}})
    ServiceCall.objects.create(service=service, action=action, key=key, pid=os.getpid(),
                               outcome=ServiceCall.Outcome.APPLIED if created
                               else ServiceCall.Outcome.ALREADY)
    if created and fault is not None and fault.mode == ServiceFault.Mode.HANG_AFTER_EFFECT:
        time.sleep(fault.seconds)
    return effect.detail


def set_fault(service: str, action: str, mode: str, *, seconds: float = 30.0,
              message: str = "") -> None:
    ServiceFault.objects.update_or_create(service=service, action=action,
                                          defaults={"mode": mode, "seconds": seconds,
                                                    "message": message})


def clear_faults(service: str | None = None, action: str | None = None) -> int:
    rows = ServiceFault.objects.all()
    if service:
        rows = rows.filter(service=service)
    if action:
        rows = rows.filter(action=action)
    return rows.delete()[0]


def effects(service: str, action: str, key_prefix: str = "") -> list[str]:
    """The keys an action took effect for, oldest first."""
    return list(ServiceEffect.objects.filter(service=service, action=action,
                                             key__startswith=key_prefix)
                .values_list("key", flat=True))
