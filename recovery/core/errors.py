"""Exceptions a task raises to say what went wrong and whether retrying can help.

Raising one of these is the most direct way to steer recovery: the classifier
trusts them before any built-in rule, so a task that knows a payment was
declined can say ``raise DependencyError("card declined", permanent=True)``
and skip the retries that would only hammer the payment provider.
"""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded

from .kinds import FailureKind
from .names import public_module

__all__ = [
    "RecoveryError",
    "exception_path",
    "TransientError",
    "PermanentError",
    "DependencyError",
    "DataIntegrityError",
    "ResourceExhaustedError",
    "TimeoutOrDeadlockError",
    "RehearsalFault",
    "RehearsedTimeLimit",
]


class RecoveryError(Exception):
    """Base of every classified error; carries its own kind and permanence."""

    kind: FailureKind = FailureKind.OTHER
    default_permanent: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        permanent: bool | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent = self.default_permanent if permanent is None else bool(permanent)
        if retry_after_seconds is not None and retry_after_seconds < 0:
            raise ValueError("retry_after_seconds must be >= 0 or None")
        self.retry_after_seconds = retry_after_seconds

    def __reduce__(self):  # keep keyword state when Celery pickles/serialises the error
        return (
            _rebuild,
            (type(self), str(self), self.permanent, self.retry_after_seconds),
        )


def _rebuild(cls, message, permanent, retry_after_seconds):
    return cls(message, permanent=permanent, retry_after_seconds=retry_after_seconds)


class TransientError(RecoveryError):
    """Something that will likely succeed if tried again later; the kind is unknown."""

    default_permanent = False

    def __init__(self, message: str = "", *, retry_after_seconds: float | None = None,
                 permanent: bool | None = None) -> None:
        super().__init__(message, permanent=permanent, retry_after_seconds=retry_after_seconds)


class PermanentError(RecoveryError):
    """Retrying cannot help; park the task for an operator (or its fallback)."""

    default_permanent = True

    def __init__(self, message: str = "", *, permanent: bool | None = None,
                 retry_after_seconds: float | None = None) -> None:
        super().__init__(message, permanent=permanent, retry_after_seconds=retry_after_seconds)


class DependencyError(RecoveryError):
    """An external API, database or service failed. Transient unless told otherwise."""

    kind = FailureKind.DEPENDENCY


class DataIntegrityError(RecoveryError):
    """The data itself is corrupt or invalid: retrying the same input cannot help."""

    kind = FailureKind.DATA_INTEGRITY
    default_permanent = True


class ResourceExhaustedError(RecoveryError):
    """A rate limit, quota, disk or memory ran out. Transient; say when to come back."""

    kind = FailureKind.RESOURCE_EXHAUSTED


class TimeoutOrDeadlockError(RecoveryError):
    """The work timed out or lost a deadlock; usually resolves when retried."""

    kind = FailureKind.TIMEOUT


def exception_path(exc: BaseException | type) -> str:
    """The dotted path letters and fingerprints name an exception class by (``builtins``
    left out: ``ValueError``, not ``builtins.ValueError``). recovery's own exceptions keep
    their 0.1 path (``recovery.errors.PermanentError``; :mod:`recovery.core.names`), so a
    failure's group and open incident carry on across the upgrade."""
    cls = exc if isinstance(exc, type) else type(exc)
    module = public_module(cls.__module__)
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


# -- what a failure rehearsal injects (recovery.workflows.rehearsals) ---------------------------


class RehearsalFault(RecoveryError):
    """The failure a rehearsal injected: classified as its declared kind and permanence,
    like the real failure it stands for."""

    def __init__(self, message: str = "", *, kind: str = "dependency",
                 permanent: bool | None = None, retry_after_seconds: float | None = None) -> None:
        super().__init__(message, permanent=permanent, retry_after_seconds=retry_after_seconds)
        self.kind = FailureKind(kind)

    def __reduce__(self):
        return (_rebuild_fault, (str(self), self.kind.value, self.permanent))


def _rebuild_fault(message: str, kind: str, permanent: bool) -> "RehearsalFault":
    return RehearsalFault(message, kind=kind, permanent=permanent)


class RehearsedTimeLimit(SoftTimeLimitExceeded):
    """A time limit a rehearsal injected: Celery's own soft limit, so it is classified
    and handled exactly as a real one."""
