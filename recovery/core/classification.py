"""Turn any exception into a :class:`Failure`: a scenario kind, transient or permanent.

A rule is a plain callable ``exception -> Failure | None``. The classifier asks
the project's rules first, then the built-in ones, and walks the exception's
cause chain (``raise ... from``) so a wrapper such as Django's
``OperationalError`` is classified by the driver error inside it. Built-in
rules for optional libraries (requests, httpx, redis, psycopg) look the
library up in ``sys.modules`` instead of importing it: an exception from a
library that was never imported cannot be raised, and workers stay lean.
"""

from __future__ import annotations

import errno
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone

from .errors import RecoveryError
from .kinds import FailureKind

__all__ = ["Failure", "Rule", "classify", "BUILTIN_RULES", "parse_retry_after"]


@dataclass(frozen=True)
class Failure:
    """What the classifier concluded about one exception.

    Attributes:
        kind: the scenario family.
        permanent: True when retrying the same input cannot succeed.
        retry_after_seconds: a delay the failing party asked for (Retry-After), if any.
        reason: a short human explanation of which rule matched, shown to operators.
    """

    kind: FailureKind
    permanent: bool
    retry_after_seconds: float | None = None
    reason: str = ""

    @property
    def transient(self) -> bool:
        return not self.permanent

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value,
            "permanent": self.permanent,
            "retry_after_seconds": self.retry_after_seconds,
            "reason": self.reason,
        }


Rule = Callable[[BaseException], "Failure | None"]

_MAX_CHAIN_DEPTH = 8


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN_DEPTH:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )


def classify(exc: BaseException, rules: Sequence[Rule] = ()) -> Failure:
    """Classify ``exc`` with ``rules`` (the project's, asked first) then the built-ins.

    A rule that raises is skipped: a buggy project rule must never stop a task
    from being retried or parked. Unmatched exceptions are transient ``other``
    so the default policy retries them and parks them when it gives up.
    """
    all_rules: Iterable[Rule] = (*rules, *BUILTIN_RULES)
    for candidate in _chain(exc):
        for rule in all_rules:
            try:
                failure = rule(candidate)
            except Exception:  # noqa: BLE001 - a broken rule must not break recovery
                continue
            if failure is not None:
                return failure
    return Failure(FailureKind.OTHER, permanent=False, reason="unclassified")


# --- Retry-After -------------------------------------------------------------------------


def parse_retry_after(value: object, now: datetime | None = None) -> float | None:
    """Parse an HTTP Retry-After value (delta-seconds or HTTP-date) into seconds."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if not math.isfinite(seconds):  # "inf"/"nan" parse as floats but are not delays
        return None
    return max(0.0, seconds)


# --- built-in rules ----------------------------------------------------------------------


def recovery_errors_rule(exc: BaseException) -> Failure | None:
    if isinstance(exc, RecoveryError):
        return Failure(exc.kind, exc.permanent, exc.retry_after_seconds, type(exc).__name__)
    return None


def celery_time_limit_rule(exc: BaseException) -> Failure | None:
    billiard = sys.modules.get("billiard.exceptions")
    if billiard is None:
        return None
    if isinstance(exc, (billiard.SoftTimeLimitExceeded, billiard.TimeLimitExceeded)):
        return Failure(FailureKind.TIMEOUT, False, None, "celery time limit")
    return None


def _sqlstate_failure(sqlstate: str) -> Failure | None:
    if sqlstate in ("40P01", "40001"):
        reason = "deadlock" if sqlstate == "40P01" else "serialization failure"
        return Failure(FailureKind.TIMEOUT, False, None, f"postgres {reason} ({sqlstate})")
    if sqlstate == "57014":
        return Failure(FailureKind.TIMEOUT, False, None, "postgres statement timeout (57014)")
    if sqlstate == "55P03":
        return Failure(FailureKind.TIMEOUT, False, None, "postgres lock not available (55P03)")
    cls = sqlstate[:2]
    if cls == "53":
        return Failure(FailureKind.RESOURCE_EXHAUSTED, False, None,
                       f"postgres insufficient resources ({sqlstate})")
    if cls in ("08", "57"):
        return Failure(FailureKind.DEPENDENCY, False, None, f"postgres unavailable ({sqlstate})")
    if cls in ("22", "23"):
        return Failure(FailureKind.DATA_INTEGRITY, True, None, f"postgres data error ({sqlstate})")
    return None


def psycopg_rule(exc: BaseException) -> Failure | None:
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return None
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        found = _sqlstate_failure(sqlstate)
        if found is not None:
            return found
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return Failure(FailureKind.DEPENDENCY, False, None, "database connection")
    if isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)):
        return Failure(FailureKind.DATA_INTEGRITY, True, None, "database integrity")
    return None


def django_rule(exc: BaseException) -> Failure | None:
    db = sys.modules.get("django.db.utils")
    core = sys.modules.get("django.core.exceptions")
    if db is not None and isinstance(exc, db.Error):
        cause = exc.__cause__
        sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if sqlstate:
            found = _sqlstate_failure(sqlstate)
            if found is not None:
                return found
        if isinstance(exc, (db.OperationalError, db.InterfaceError)):
            return Failure(FailureKind.DEPENDENCY, False, None, "database connection")
        if isinstance(exc, (db.IntegrityError, db.DataError)):
            return Failure(FailureKind.DATA_INTEGRITY, True, None, "database integrity")
        return None
    if core is not None:
        if isinstance(exc, core.ValidationError):
            return Failure(FailureKind.DATA_INTEGRITY, True, None, "validation error")
        if isinstance(exc, core.ObjectDoesNotExist):
            # Often a task published before its transaction committed (celery#3957):
            # worth a few retries, and parked as data integrity when it persists.
            return Failure(FailureKind.DATA_INTEGRITY, False, None, "object does not exist (yet)")
    return None


def _http_status_failure(status: int, retry_after: object, library: str) -> Failure | None:
    delay = parse_retry_after(retry_after)
    if status == 429:
        return Failure(FailureKind.RESOURCE_EXHAUSTED, False, delay, f"{library}: HTTP 429")
    if status == 408:
        return Failure(FailureKind.DEPENDENCY, False, delay, f"{library}: HTTP 408")
    if 500 <= status <= 599:
        return Failure(FailureKind.DEPENDENCY, False, delay, f"{library}: HTTP {status}")
    if 400 <= status <= 499:
        return Failure(FailureKind.DEPENDENCY, True, None, f"{library}: HTTP {status}")
    return None


def requests_rule(exc: BaseException) -> Failure | None:
    requests_exc = sys.modules.get("requests.exceptions")
    if requests_exc is None or not isinstance(exc, requests_exc.RequestException):
        return None
    response = getattr(exc, "response", None)
    if isinstance(exc, requests_exc.HTTPError) and response is not None:
        return _http_status_failure(response.status_code, response.headers.get("Retry-After"),
                                    "requests")
    if isinstance(exc, (requests_exc.ConnectionError, requests_exc.Timeout)):
        return Failure(FailureKind.DEPENDENCY, False, None, "requests: connection/timeout")
    return None


def httpx_rule(exc: BaseException) -> Failure | None:
    httpx = sys.modules.get("httpx")
    if httpx is None:
        return None
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        return _http_status_failure(response.status_code, response.headers.get("Retry-After"),
                                    "httpx")
    if isinstance(exc, httpx.TransportError):
        return Failure(FailureKind.DEPENDENCY, False, None, "httpx: transport/timeout")
    return None


def urllib_rule(exc: BaseException) -> Failure | None:
    urllib_error = sys.modules.get("urllib.error")
    if urllib_error is None:
        return None
    if isinstance(exc, urllib_error.HTTPError):
        return _http_status_failure(exc.code, exc.headers.get("Retry-After") if exc.headers else None,
                                    "urllib")
    if isinstance(exc, urllib_error.URLError):
        return Failure(FailureKind.DEPENDENCY, False, None, "urllib: connection")
    return None


def redis_rule(exc: BaseException) -> Failure | None:
    redis_exc = sys.modules.get("redis.exceptions")
    if redis_exc is None:
        return None
    if isinstance(exc, (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.BusyLoadingError)):
        return Failure(FailureKind.DEPENDENCY, False, None, "redis unavailable")
    if isinstance(exc, redis_exc.ResponseError) and "OOM" in str(exc):
        return Failure(FailureKind.RESOURCE_EXHAUSTED, False, None, "redis out of memory")
    return None


def resources_rule(exc: BaseException) -> Failure | None:
    if isinstance(exc, MemoryError):
        return Failure(FailureKind.RESOURCE_EXHAUSTED, False, None, "out of memory")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure(FailureKind.RESOURCE_EXHAUSTED, False, None, "disk full or quota exceeded")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return Failure(FailureKind.RESOURCE_EXHAUSTED, False, None, "too many open files")
    return None


def stdlib_rule(exc: BaseException) -> Failure | None:
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return Failure(FailureKind.DATA_INTEGRITY, True, None, "undecodable data")
    if isinstance(exc, TimeoutError):
        return Failure(FailureKind.TIMEOUT, False, None, "timeout")
    if isinstance(exc, ConnectionError):
        return Failure(FailureKind.DEPENDENCY, False, None, "connection error")
    return None


def kombu_rule(exc: BaseException) -> Failure | None:
    kombu_exc = sys.modules.get("kombu.exceptions")
    if kombu_exc is not None and isinstance(exc, kombu_exc.OperationalError):
        return Failure(FailureKind.DEPENDENCY, False, None, "broker unavailable")
    return None


BUILTIN_RULES: tuple[Rule, ...] = (
    recovery_errors_rule,
    celery_time_limit_rule,
    psycopg_rule,
    django_rule,
    requests_rule,
    httpx_rule,
    urllib_rule,
    redis_rule,
    kombu_rule,
    resources_rule,
    stdlib_rule,
)
