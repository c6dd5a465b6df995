"""RetryPolicy: how often and how patiently a task is retried, as an immutable value.

Modelled on Temporal's RetryPolicy: every field has a documented default,
non-retryable errors can be named by dotted path so a policy can live in the
``RECOVERY`` settings, and validation fails at class creation with a message
that says how to fix the mistake. ``per_kind`` overrides fields for one
failure kind (e.g. a longer cap for rate limits), the feature Temporal users
ask for most (temporalio/temporal#131).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from django.utils.module_loading import import_string

from .. import conf

from .backoff import Jitter, Uniform, backoff_delay
from .classification import Failure
from .kinds import FailureKind

__all__ = ["RetryPolicy", "Verdict", "Action", "Attempt", "default_policy"]

# A server asking for more than this is treated as asking for this (and a policy with
# max_elapsed_seconds parks instead): it keeps scheduling arithmetic finite.
MAX_RETRY_AFTER_SECONDS = 30 * 24 * 3600.0

_PER_KIND_FIELDS = frozenset(
    {"max_attempts", "initial_delay_seconds", "multiplier", "max_delay_seconds", "jitter",
     "max_elapsed_seconds"}
)


class Action(str, Enum):
    RETRY = "retry"
    PARK = "park"


@dataclass(frozen=True)
class Verdict:
    """What to do with one failure: retry after ``delay_seconds``, or park.

    ``reason`` is a sentence for operators ("permanent failure", "gave up after 4 attempts").
    """

    action: Action
    delay_seconds: float | None = None
    reason: str = ""

    @classmethod
    def retry(cls, delay_seconds: float, reason: str = "") -> "Verdict":
        return cls(Action.RETRY, float(delay_seconds), reason)

    @classmethod
    def park(cls, reason: str) -> "Verdict":
        return cls(Action.PARK, None, reason)

    @property
    def retrying(self) -> bool:
        return self.action is Action.RETRY


@dataclass(frozen=True)
class Attempt:
    """One failed attempt as the policy sees it (built from the message's history header)."""

    delay_seconds: float | None = None


def _as_exception_type(value: Any) -> type[BaseException]:
    if isinstance(value, str):
        try:
            value = import_string(value)
        except ImportError as exc:
            raise ValueError(
                f"non_retryable entry {value!r} cannot be imported ({exc}); "
                "use a dotted path such as 'myapp.errors.CardDeclined'"
            ) from None
    if not (isinstance(value, type) and issubclass(value, BaseException)):
        raise ValueError(f"non_retryable entry {value!r} is not an exception class")
    return value


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class RetryPolicy:
    """How a task is retried before it is parked.

    Attributes:
        max_attempts: runs allowed in total, the first included (4 = 1 run + 3 retries).
            Default 5. ``1`` means never retry.
        initial_delay_seconds: the delay before the first retry. Default 1.0.
        multiplier: growth factor of the delay per retry. Default 2.0.
        max_delay_seconds: cap of any one backoff delay. Default 300. A longer
            Retry-After from the failing party still wins.
        jitter: ``"full"`` (default), ``"equal"``, ``"decorrelated"`` or ``"none"``.
        max_elapsed_seconds: give up once this much time has passed since the first
            attempt (or would have, by the next attempt). Default None (no limit).
        non_retryable: exception classes, or their dotted paths, that park at once
            whatever the classifier says. Default empty.
        per_kind: ``{kind: {field: value}}`` overrides for failures of one kind, e.g.
            ``{"resource_exhausted": {"max_delay_seconds": 3600}}``.
    """

    max_attempts: int = 5
    initial_delay_seconds: float = 1.0
    multiplier: float = 2.0
    max_delay_seconds: float = 300.0
    jitter: Jitter | str = Jitter.FULL
    max_elapsed_seconds: float | None = None
    non_retryable: Sequence[type[BaseException] | str] = ()
    per_kind: Mapping[FailureKind | str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1 (got {self.max_attempts!r})")
        for name in ("initial_delay_seconds", "max_delay_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
        if (not isinstance(self.multiplier, (int, float)) or not math.isfinite(self.multiplier)
                or self.multiplier < 1):
            raise ValueError(f"multiplier must be a finite number >= 1 (got {self.multiplier!r})")
        if self.max_delay_seconds < self.initial_delay_seconds:
            raise ValueError(
                f"max_delay_seconds ({self.max_delay_seconds}) is below initial_delay_seconds "
                f"({self.initial_delay_seconds}); raise the cap or lower the initial delay"
            )
        if self.max_elapsed_seconds is not None and (
            not isinstance(self.max_elapsed_seconds, (int, float))
            or not math.isfinite(self.max_elapsed_seconds) or self.max_elapsed_seconds <= 0
        ):
            raise ValueError("max_elapsed_seconds must be a positive number or None")
        try:
            object.__setattr__(self, "jitter", Jitter(self.jitter))
        except ValueError:
            choices = ", ".join(repr(j.value) for j in Jitter)
            raise ValueError(f"jitter must be one of {choices} (got {self.jitter!r})") from None
        object.__setattr__(
            self, "non_retryable", tuple(_as_exception_type(e) for e in self.non_retryable)
        )
        per_kind = self._validated_per_kind(self.per_kind)
        base = {name: getattr(self, name) for name in _PER_KIND_FIELDS}
        for overrides in per_kind.values():
            RetryPolicy(**{**base, **overrides})  # fail now, not at the first failure
        object.__setattr__(self, "per_kind", per_kind)

    @staticmethod
    def _validated_per_kind(per_kind: Mapping) -> Mapping[FailureKind, Mapping[str, Any]]:
        validated: dict[FailureKind, Mapping[str, Any]] = {}
        for raw_kind, overrides in dict(per_kind).items():
            try:
                kind = FailureKind(raw_kind)
            except ValueError:
                choices = ", ".join(k.value for k in FailureKind)
                raise ValueError(f"per_kind key {raw_kind!r} is not a failure kind ({choices})") \
                    from None
            if isinstance(overrides, RetryPolicy):
                overrides = {name: getattr(overrides, name) for name in _PER_KIND_FIELDS}
            unknown = set(overrides) - _PER_KIND_FIELDS
            if unknown:
                raise ValueError(
                    f"per_kind[{kind.value!r}] has unknown fields {sorted(unknown)}; "
                    f"allowed: {sorted(_PER_KIND_FIELDS)}"
                )
            validated[kind] = MappingProxyType(dict(overrides))
        return MappingProxyType(validated)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that :meth:`from_dict` turns back into an equal policy."""
        return {
            "max_attempts": self.max_attempts,
            "initial_delay_seconds": self.initial_delay_seconds,
            "multiplier": self.multiplier,
            "max_delay_seconds": self.max_delay_seconds,
            "jitter": Jitter(self.jitter).value,
            "max_elapsed_seconds": self.max_elapsed_seconds,
            "non_retryable": [_dotted(cls) for cls in self.non_retryable],
            "per_kind": {kind.value: dict(over) for kind, over in self.per_kind.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RetryPolicy":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RetryPolicy fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**dict(data))

    def merged(self, overrides: Mapping[str, Any]) -> "RetryPolicy":
        """This policy with some fields replaced (used for per-call overrides)."""
        return self.from_dict({**self.to_dict(), **dict(overrides)})

    def for_kind(self, kind: FailureKind) -> "RetryPolicy":
        overrides = self.per_kind.get(kind)
        if not overrides:
            return self
        return replace(self, **overrides, per_kind={})

    # -- decisions ------------------------------------------------------------------------

    def decide(
        self,
        failure: Failure,
        history: Sequence[Attempt],
        *,
        exception: BaseException | None = None,
        elapsed_seconds: float = 0.0,
        uniform: Uniform = random.uniform,
    ) -> Verdict:
        """Turn one failure into a verdict.

        Args:
            failure: the classification of the exception just raised.
            history: the earlier failed attempts of this run, oldest first (the current
                attempt is not in it), so ``len(history) + 1`` attempts have now run.
            exception: the exception itself, checked against ``non_retryable``.
            elapsed_seconds: time since the first attempt of this run.
            uniform: injected randomness for the jitter.
        """
        if exception is not None and self.non_retryable and isinstance(exception, self.non_retryable):
            return Verdict.park(f"{type(exception).__name__} is non-retryable for this task")
        if failure.permanent:
            return Verdict.park(f"permanent failure ({failure.reason or failure.kind.value})")
        policy = self.for_kind(failure.kind)
        attempts_so_far = len(history) + 1
        if attempts_so_far >= policy.max_attempts:
            return Verdict.park(f"gave up after {attempts_so_far} attempts")
        previous = next((a.delay_seconds for a in reversed(history) if a.delay_seconds), None)
        delay = backoff_delay(
            attempts_so_far,
            initial=policy.initial_delay_seconds,
            multiplier=policy.multiplier,
            cap=policy.max_delay_seconds,
            jitter=Jitter(policy.jitter),
            previous_delay=previous,
            uniform=uniform,
        )
        reason = f"attempt {attempts_so_far} of {policy.max_attempts} failed"
        if failure.retry_after_seconds is not None and failure.retry_after_seconds > delay:
            delay = min(failure.retry_after_seconds, MAX_RETRY_AFTER_SECONDS)
            reason += "; honouring Retry-After"
        if policy.max_elapsed_seconds is not None and (
            elapsed_seconds + delay > policy.max_elapsed_seconds
        ):
            return Verdict.park(
                f"gave up: next attempt would pass max_elapsed_seconds={policy.max_elapsed_seconds:g}"
            )
        return Verdict.retry(delay, reason)


def default_policy() -> RetryPolicy:
    """The project's ``RECOVERY["DEFAULT_POLICY"]`` (a ``RetryPolicy`` or its dict form),
    or the library default; a dict is parsed once per distinct value."""
    value = conf.get("DEFAULT_POLICY")
    if value is None:
        return RetryPolicy()
    if isinstance(value, RetryPolicy):
        return value
    return _policy_from_dict(_freeze(value))


@lru_cache(maxsize=64)
def _policy_from_dict(frozen: Any) -> RetryPolicy:
    return RetryPolicy.from_dict(_thaw(frozen))


def _freeze(value: Any) -> Any:
    """A hashable copy of a settings value, so the parse can be cached."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    if isinstance(value, tuple):
        return {k: _thaw(v) for k, v in value}
    return value
