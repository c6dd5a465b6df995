"""celery-recovery: classify task failures, retry with backoff, park what cannot heal.

The public API is what ``__all__`` lists; everything else may change. Where each part
lives, and why, is in docs/architecture.md.
"""

import importlib

from . import events
from .core.classification import Failure, Rule, classify
from .core.errors import (
    DataIntegrityError,
    DependencyError,
    PermanentError,
    RecoveryError,
    ResourceExhaustedError,
    TimeoutOrDeadlockError,
    TransientError,
)
from .core.headers import policy_header
from .core.kinds import FailureKind
from .core.policy import Action, RetryPolicy, Verdict
from .moved import install as _answer_moved_names
from .wiring import setup

_answer_moved_names()


#: Public names that need the models, which Django loads only after it has imported this
#: package (INSTALLED_APPS, and ``config/celery.py`` before ``django.setup()``): each is
#: resolved on first use instead of at import.
_NEEDS_MODELS = {
    "RecoveryTask": ".task",
    "Saga": ".workflows.sagas",
    "Step": ".workflows.sagas",
    "enqueue": ".workflows.outbox",
    "guard": ".workflows.circuit",
}


def __getattr__(name: str):
    module = _NEEDS_MODELS.get(name)
    if module is None:
        raise AttributeError(f"module 'recovery' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_NEEDS_MODELS})


__all__ = [
    "RecoveryTask",
    "RetryPolicy",
    "Verdict",
    "Action",
    "Failure",
    "FailureKind",
    "Rule",
    "classify",
    "policy_header",
    "setup",
    "events",
    "Saga",
    "Step",
    "enqueue",
    "guard",
    "RecoveryError",
    "TransientError",
    "PermanentError",
    "DependencyError",
    "DataIntegrityError",
    "ResourceExhaustedError",
    "TimeoutOrDeadlockError",
]

__version__ = "0.2.0.dev0"
