"""Circuit breakers per named dependency, shared by every worker (``recovery.workflows.shared_state``).

closed ──(failure rate ≥ threshold over the window, with enough calls)──▶ open
open ──(open_seconds elapsed)──▶ half-open: up to ``half_open_max_calls`` trial calls
half-open ──(every trial succeeded)──▶ closed;  ──(a trial failed)──▶ open again

Only failures that say the dependency is unwell count: transient failures classified as
``dependency`` or ``timeout``. Anything else (a bad row, a declined card) means the
dependency answered, and counts as a success. If the shared store itself is unreachable,
the breaker fails open (calls go through): it protects a dependency, it must not become one.

A task declares ``dependency="payments-api"``; code can also guard a call directly::

    with recovery.workflows.circuit.guard("payments-api"):
        payments.charge(...)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from .. import conf, events
from ..core.classification import classify as default_classify
from ..core.errors import DependencyError
from ..core.kinds import FailureKind
from . import shared_state
from ..core.names import logger_for

__all__ = ["CircuitPolicy", "Decision", "Circuit", "CircuitOpenError", "circuit", "guard",
           "window_counts", "CLOSED", "OPEN", "HALF_OPEN"]

logger = logger_for(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_COUNTED = (FailureKind.DEPENDENCY, FailureKind.TIMEOUT)


@dataclass(frozen=True)
class CircuitPolicy:
    """When a circuit opens and how it tries to close.

    Attributes:
        failure_rate_threshold: fraction of failed calls in the window that opens it.
        minimum_calls: calls in the window before the rate is judged (one failure out of
            one call is not an outage).
        window_seconds: how far back calls count.
        open_seconds: how long it stays open before trial calls are let through; also how
            long a trial may take before its permit is handed out again.
        half_open_max_calls: trial calls let through at once; all must succeed to close.
    """

    failure_rate_threshold: float = 0.5
    minimum_calls: int = 5
    window_seconds: float = 60.0
    open_seconds: float = 30.0
    half_open_max_calls: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError("failure_rate_threshold must be in (0, 1], e.g. 0.5")
        if self.minimum_calls < 1 or self.half_open_max_calls < 1:
            raise ValueError("minimum_calls and half_open_max_calls must be at least 1")
        if self.window_seconds <= 0 or self.open_seconds <= 0:
            raise ValueError("window_seconds and open_seconds must be positive")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CircuitPolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown circuit policy fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def bucket_seconds(self) -> float:
        return self.window_seconds / 10


@dataclass(frozen=True)
class Decision:
    allowed: bool
    state: str
    retry_in_seconds: float = 0.0
    trial: bool = False


class CircuitOpenError(DependencyError):
    """A call was refused because the dependency's circuit is open (transient: retry after
    ``retry_after_seconds``)."""

    def __init__(self, dependency: str, retry_after_seconds: float = 0.0) -> None:
        super().__init__(f"circuit for {dependency!r} is open; retry in "
                         f"{retry_after_seconds:.1f}s", retry_after_seconds=retry_after_seconds)
        self.dependency = dependency
        # Celery's JSON result serialization rebuilds an exception as cls(*args).
        self.args = (dependency, retry_after_seconds)

    def __str__(self) -> str:
        return (f"circuit for {self.dependency!r} is open; retry in "
                f"{self.retry_after_seconds or 0.0:.1f}s")

    def __reduce__(self):
        return (type(self), (self.dependency, self.retry_after_seconds or 0.0))


# -- the state machine, as pure functions of (record, now, policy) ---------------------------


def _allow(record: dict, now: float, policy: CircuitPolicy) -> Decision:
    state = record.get("state", CLOSED)
    if state == CLOSED:
        return Decision(True, CLOSED)
    if state == OPEN:
        if now < record["open_until"]:
            return Decision(False, OPEN, record["open_until"] - now)
        record.update(state=HALF_OPEN, trials=0, trial_successes=0, half_open_since=now,
                      changed_at=now)
    # half-open: hand out trial permits; permits of trials that never reported (a killed
    # worker) are handed out again after open_seconds.
    if now - record.get("half_open_since", now) > policy.open_seconds:
        record.update(trials=0, trial_successes=0, half_open_since=now)
    if record.get("trials", 0) < policy.half_open_max_calls:
        record["trials"] = record.get("trials", 0) + 1
        return Decision(True, HALF_OPEN, trial=True)
    return Decision(False, HALF_OPEN,
                    max(0.5, record["half_open_since"] + policy.open_seconds - now))


def _open(record: dict, now: float, policy: CircuitPolicy) -> None:
    record.update(state=OPEN, open_until=now + policy.open_seconds, opened_at=now, changed_at=now,
                  buckets={}, opened=record.get("opened", 0) + 1)


def window_counts(record: Mapping[str, Any], now: float, policy: CircuitPolicy) -> tuple[int, int]:
    """(calls, failures) a circuit's record holds in its window at ``now``, for operators.
    (An open or half-open circuit keeps none: it counts again once it has closed.)"""
    oldest = int(now // policy.bucket_seconds) - 9
    kept = [v for k, v in (record.get("buckets") or {}).items() if int(k) >= oldest]
    return sum(v[0] for v in kept), sum(v[1] for v in kept)


def _record(record: dict, now: float, ok: bool, policy: CircuitPolicy,
            trial: bool | None = None) -> str:
    state = record.get("state", CLOSED)
    if state == HALF_OPEN and trial is False:
        return state  # a call let through before it opened: only trials decide now
    if state == HALF_OPEN:
        if not ok:
            _open(record, now, policy)
        else:
            record["trial_successes"] = record.get("trial_successes", 0) + 1
            if record["trial_successes"] >= policy.half_open_max_calls:
                record.update(state=CLOSED, buckets={}, changed_at=now)
        return record["state"]
    if state == OPEN:
        return OPEN  # a call let through before it opened: its outcome changes nothing
    bucket = int(now // policy.bucket_seconds)
    oldest = bucket - 9
    buckets = {k: v for k, v in (record.get("buckets") or {}).items() if int(k) >= oldest}
    calls, failures = buckets.get(str(bucket), [0, 0])
    buckets[str(bucket)] = [calls + 1, failures + (0 if ok else 1)]
    record["buckets"] = buckets
    total = sum(v[0] for v in buckets.values())
    failed = sum(v[1] for v in buckets.values())
    if not ok and total >= policy.minimum_calls and failed / total >= policy.failure_rate_threshold:
        _open(record, now, policy)
    return record.get("state", CLOSED)


# -- the closed state's count, as one Redis script ------------------------------------------
#
# Every call of every worker writes the closed circuit's window; with WATCH/MULTI, writers
# of one hot key retry each other's conflicts (bench/circuit_contention.py). This script is
# ``_record`` for a closed circuit, run where the record lives: one round trip, no retry.
# It answers nil for any other state, and the caller goes the WATCH way (rare transitions).
# ARGV: bucket, ok (1/0), minimum_calls, failure_rate_threshold, now, open_seconds.
_COUNT_CLOSED = """
local raw = redis.call('GET', KEYS[1])
local record = {}
if raw then record = cjson.decode(raw) end
if record['state'] ~= nil and record['state'] ~= 'closed' then return nil end
local oldest = tonumber(ARGV[1]) - 9
local buckets = {}
if type(record['buckets']) == 'table' then
  for bucket, counts in pairs(record['buckets']) do
    if tonumber(bucket) >= oldest then buckets[bucket] = counts end
  end
end
local ok = ARGV[2] == '1'
local counts = buckets[ARGV[1]] or {0, 0}
buckets[ARGV[1]] = {counts[1] + 1, counts[2] + (ok and 0 or 1)}
local total, failed = 0, 0
for _, counts in pairs(buckets) do
  total = total + counts[1]
  failed = failed + counts[2]
end
record['buckets'] = buckets
if (not ok) and total >= tonumber(ARGV[3]) and failed / total >= tonumber(ARGV[4]) then
  local now = tonumber(ARGV[5])
  record['state'] = 'open'
  record['open_until'] = now + tonumber(ARGV[6])
  record['opened_at'] = now
  record['changed_at'] = now
  record['buckets'] = {}
  record['opened'] = (record['opened'] or 0) + 1
end
redis.call('SET', KEYS[1], cjson.encode(record))
return record['state'] or 'closed'
"""


def _count_closed(store: shared_state.RedisStore, key: str, now: float, ok: bool,
                  policy: CircuitPolicy) -> str | None:
    """The state after counting a call on a closed circuit; None if it is not closed."""
    state = store.run_script(_COUNT_CLOSED, key, int(now // policy.bucket_seconds), int(ok),
                             policy.minimum_calls, repr(policy.failure_rate_threshold),
                             repr(now), repr(policy.open_seconds))
    return state.decode() if isinstance(state, bytes) else state


# -- a circuit on the shared store ------------------------------------------------------------


class Circuit:
    def __init__(self, name: str, policy: CircuitPolicy | None = None,
                 store: shared_state.Store | None = None, clock=time.time) -> None:
        self.name = name
        self.policy = policy or policy_for(name)
        self._store = store
        self._clock = clock

    @property
    def store(self) -> shared_state.Store:
        return self._store or shared_state.store()

    @property
    def key(self) -> str:
        return f"circuit:{self.name}"

    def allow(self) -> Decision:
        """May a call go to the dependency now? (Takes a trial permit when half-open.)"""
        now = self._clock()
        try:
            record = self.store.get(self.key)
            if record.get("state", CLOSED) == CLOSED:
                return Decision(True, CLOSED)  # the common case: one read, no write
            decision = self.store.update(self.key, lambda r: _allow(r, now, self.policy))
            if record.get("state") == OPEN and decision.state == HALF_OPEN:
                logger.info("recovery: circuit %s is now half-open", self.name)
                events.circuit_changed.send(dependency=self.name, state=HALF_OPEN)
            return decision
        except Exception as exc:  # noqa: BLE001 - fail open
            logger.warning("recovery: circuit %s: shared state unreachable (%s); letting the "
                           "call through", self.name, exc)
            return Decision(True, CLOSED)

    def record(self, ok: bool, trial: bool | None = None) -> None:
        """Count one call's outcome. ``trial``: whether ``allow()`` let it through as a
        half-open trial (``Decision.trial``); a known non-trial outcome does not decide a
        half-open circuit. None (unknown) counts as a trial."""
        now = self._clock()
        try:
            before = {}

            def change(record: dict) -> str:
                before["state"] = record.get("state", CLOSED)
                return _record(record, now, ok, self.policy, trial)

            store = self.store
            after = None
            if isinstance(store, shared_state.RedisStore):
                after = _count_closed(store, self.key, now, ok, self.policy)
                before["state"] = CLOSED
            if after is None:
                after = store.update(self.key, change)
        except Exception as exc:  # noqa: BLE001
            logger.warning("recovery: circuit %s: could not record a call (%s)", self.name, exc)
            return
        if after != before.get("state"):
            log = logger.warning if after == OPEN else logger.info
            log("recovery: circuit %s is now %s", self.name, after.replace("_", "-"))
            events.circuit_changed.send(dependency=self.name, state=after)

    def record_success(self, trial: bool | None = None) -> None:
        self.record(True, trial)

    def record_failure(self, trial: bool | None = None) -> None:
        self.record(False, trial)

    def record_exception(self, exc: BaseException, classify=None,
                         trial: bool | None = None) -> None:
        """Count ``exc`` as a failure of the dependency only if it says the dependency is
        unwell (transient dependency or timeout failure); otherwise as an answer. Another
        circuit's refusal (CircuitOpenError) made no call, and counts as nothing."""
        if isinstance(exc, CircuitOpenError):
            return
        failure = (classify or default_classify)(exc)
        self.record(not (failure.kind in _COUNTED and not failure.permanent), trial)

    def state(self) -> dict:
        """The shared record, for operators: state, open_until, calls in the window..."""
        record = self.store.get(self.key)
        record.setdefault("state", CLOSED)
        return record

    def reset(self) -> None:
        """Close it by hand (an operator knows the dependency is back)."""
        self.store.update(self.key, lambda r: (r.clear(), r.update(state=CLOSED,
                                                                      changed_at=self._clock())))
        events.circuit_changed.send(dependency=self.name, state=CLOSED)

    def trip(self, seconds: float | None = None) -> None:
        """Open it by hand (an operator takes the dependency out of use)."""
        now = self._clock()

        def change(record: dict) -> None:
            _open(record, now, self.policy)
            if seconds is not None:
                record["open_until"] = now + seconds

        self.store.update(self.key, change)
        events.circuit_changed.send(dependency=self.name, state=OPEN)


def policy_for(name: str) -> CircuitPolicy:
    circuits = conf.get("CIRCUITS") or {}
    values = circuits.get(name, circuits.get("default", {}))
    if isinstance(values, CircuitPolicy):
        return values
    return CircuitPolicy.from_dict(values or {})


def circuit(name: str) -> Circuit:
    return Circuit(name)


@contextmanager
def guard(name: str) -> Iterator[Circuit]:
    """Run a block against dependency ``name``: refused with CircuitOpenError while its
    circuit is open; its outcome counts towards the circuit."""
    breaker = circuit(name)
    decision = breaker.allow()
    if not decision.allowed:
        raise CircuitOpenError(name, decision.retry_in_seconds)
    try:
        yield breaker
    except Exception as exc:
        breaker.record_exception(exc, trial=decision.trial)
        raise
    breaker.record_success(trial=decision.trial)
