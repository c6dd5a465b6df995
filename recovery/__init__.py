"""celery-recovery: classify task failures, retry with backoff, park what cannot heal.

The public API is what ``__all__`` lists; everything else may change.
"""

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


def __getattr__(name: str):
    # RecoveryTask needs the store, whose models Django loads only after it has imported
    # this package (INSTALLED_APPS): resolved on first use instead of at import.
    if name == "RecoveryTask":
        from .task import RecoveryTask

        return RecoveryTask
    raise AttributeError(f"module 'recovery' has no attribute {name!r}")


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
    "RecoveryError",
    "TransientError",
    "PermanentError",
    "DependencyError",
    "DataIntegrityError",
    "ResourceExhaustedError",
    "TimeoutOrDeadlockError",
]

__version__ = "0.1.0"
