"""Recovery's tables, one module per concern.

* ``letters``: dead letters and the operators' audit trail (their status transitions
  are told there).
* ``retries``: the due-table of long retry delays, and per-task delivery counts.
* ``outbox``: tasks to publish once the transaction that wrote them commits.
* ``resilience``: shared circuit and degraded-mode state, and the fallbacks taken.
* ``sagas``: saga runs, their steps and their audit trail.
* ``incidents``: failures escalated to a human, and the notifications about them.
* ``effects``: effects in the application's database that ran once per task.
* ``rehearsals``: failures injected on purpose, what they hit, who started them.

Django finds the models through ``recovery.models``, which re-exports this package, so
``recovery.models.X`` and ``recovery.store.models.X`` are the same class. Every model
belongs to the ``recovery`` app whichever module defines it, so the split left table
names, indexes and migrations as they were. The imports run from the tables others
point at to the tables that point at them, which is the order the app registry lists.
"""

from __future__ import annotations

from .letters import DeadLetter, DeadLetterEvent
from .retries import DeliveryCount, DueRetry
from .outbox import OutboxMessage
from .resilience import FallbackUse, SharedState
from .sagas import SagaEvent, SagaRun, SagaStep
from .incidents import Incident, IncidentNotification
from .effects import Effect
from .rehearsals import Rehearsal, RehearsalEvent, RehearsalInjection

__all__ = ["DeadLetter", "DueRetry", "DeliveryCount", "DeadLetterEvent", "OutboxMessage",
           "SharedState", "FallbackUse", "SagaRun", "SagaStep", "SagaEvent", "Incident",
           "IncidentNotification", "Effect", "Rehearsal", "RehearsalEvent",
           "RehearsalInjection"]
