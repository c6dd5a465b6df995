"""celery-recovery: classify task failures, retry with backoff, park what cannot heal.

The public API is what ``__all__`` lists; everything else may change.
"""

from .classification import Failure, Rule, classify
from .errors import (
    DataIntegrityError,
    DependencyError,
    PermanentError,
    RecoveryError,
    ResourceExhaustedError,
    TimeoutOrDeadlockError,
    TransientError,
)
from .headers import policy_header
from .kinds import FailureKind
from .policy import Action, RetryPolicy, Verdict
from .task import RecoveryTask
from .wiring import setup

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
