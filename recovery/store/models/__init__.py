"""Recovery's tables, one module per concern; the package re-exports them all, so
``recovery.store.models.X`` and ``recovery.models.X`` name the same class.
"""

from __future__ import annotations

from .letters import DeadLetter, DeadLetterEvent
from .retries import DeliveryCount, DueRetry
from .outbox import OutboxMessage
from .resilience import FallbackUse, SharedState
from .sagas import SagaEvent, SagaRun, SagaStep
from .incidents import Incident, IncidentNotification

__all__ = ["DeadLetter", "DueRetry", "DeliveryCount", "DeadLetterEvent", "OutboxMessage",
           "SharedState", "FallbackUse", "SagaRun", "SagaStep", "SagaEvent", "Incident",
           "IncidentNotification"]
