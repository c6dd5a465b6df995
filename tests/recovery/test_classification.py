"""recovery.core.classification: every built-in rule on real library exceptions, project rules,
the cause chain, and Retry-After parsing."""

from __future__ import annotations

import email.message
import errno
import json
import math
import pickle
import urllib.error
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import celery.exceptions
import django.db.utils
import httpx
import kombu.exceptions
import psycopg
import psycopg.errors
import pytest
import redis.exceptions
import requests
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import connection, transaction
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.core.classification import BUILTIN_RULES, Failure, classify, parse_retry_after
from recovery.core.errors import (DataIntegrityError, DependencyError, PermanentError, RecoveryError, ResourceExhaustedError, TimeoutOrDeadlockError, TransientError)
from recovery.core.kinds import FailureKind
from recovery.models import DeadLetter

DEPENDENCY = FailureKind.DEPENDENCY
DATA = FailureKind.DATA_INTEGRITY
EXHAUSTED = FailureKind.RESOURCE_EXHAUSTED
TIMEOUT = FailureKind.TIMEOUT
OTHER = FailureKind.OTHER


def assert_classified(exc, kind, *, permanent, retry_after=None):
    failure = classify(exc)
    assert failure.kind is kind, failure
    assert failure.permanent is permanent, failure
    assert failure.transient is (not permanent)
    assert failure.retry_after_seconds == retry_after, failure
    assert failure.reason  # operators always get a sentence
    return failure


def raised_from(outer, inner):
    """``outer`` raised ``from inner``, the way library wrappers do it."""
    try:
        try:
            raise inner
        except BaseException as caught:
            raise outer from caught
    except BaseException as final:
        return final


# -- recovery.core.errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kind", "permanent"),
    [
        (RecoveryError, OTHER, False),
        (TransientError, OTHER, False),
        (PermanentError, OTHER, True),
        (DependencyError, DEPENDENCY, False),
        (DataIntegrityError, DATA, True),
        (ResourceExhaustedError, EXHAUSTED, False),
        (TimeoutOrDeadlockError, TIMEOUT, False),
    ],
)
def test_recovery_errors_carry_their_kind_and_default_permanence(cls, kind, permanent):
    failure = assert_classified(cls("boom"), kind, permanent=permanent)
    assert failure.reason == cls.__name__


@pytest.mark.parametrize(
    "cls",
    [RecoveryError, TransientError, PermanentError, DependencyError, DataIntegrityError,
     ResourceExhaustedError, TimeoutOrDeadlockError],
)
@pytest.mark.parametrize("permanent", [True, False])
def test_recovery_errors_honour_an_explicit_permanence(cls, permanent):
    assert classify(cls("x", permanent=permanent)).permanent is permanent


def test_a_declined_card_can_skip_retries():
    assert_classified(DependencyError("card declined", permanent=True), DEPENDENCY,
                      permanent=True)


def test_data_integrity_can_be_declared_transient():
    assert_classified(DataIntegrityError("row not replicated yet", permanent=False), DATA,
                      permanent=False)


@pytest.mark.parametrize("cls", [ResourceExhaustedError, TransientError, DependencyError])
def test_recovery_errors_carry_their_retry_after(cls):
    failure = classify(cls("slow down", retry_after_seconds=12.5))
    assert failure.retry_after_seconds == 12.5


def test_a_negative_retry_after_on_a_recovery_error_is_rejected():
    with pytest.raises(ValueError, match="retry_after_seconds"):
        ResourceExhaustedError("quota", retry_after_seconds=-1)


@pytest.mark.parametrize(
    "exc",
    [
        PermanentError("gone", permanent=False, retry_after_seconds=3.0),
        DependencyError("card declined", permanent=True),
        ResourceExhaustedError("quota", retry_after_seconds=60),
        DataIntegrityError("bad row"),
    ],
)
def test_recovery_errors_classify_the_same_after_a_pickle_round_trip(exc):
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert classify(copy) == classify(exc)


# -- psycopg ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind", "permanent"),
    [
        (psycopg.errors.DeadlockDetected("deadlock detected"), TIMEOUT, False),
        (psycopg.errors.SerializationFailure("could not serialize"), TIMEOUT, False),
        (psycopg.errors.QueryCanceled("statement timeout"), TIMEOUT, False),
        (psycopg.errors.LockNotAvailable("lock not available"), TIMEOUT, False),
        (psycopg.errors.UniqueViolation("duplicate key"), DATA, True),
        (psycopg.errors.ForeignKeyViolation("fk"), DATA, True),
        (psycopg.errors.NumericValueOutOfRange("out of range"), DATA, True),
        (psycopg.errors.DiskFull("disk full"), EXHAUSTED, False),
        (psycopg.errors.TooManyConnections("too many"), EXHAUSTED, False),
        (psycopg.errors.AdminShutdown("terminating connection"), DEPENDENCY, False),
        (psycopg.errors.ConnectionFailure("connection failure"), DEPENDENCY, False),
        (psycopg.OperationalError("connection refused"), DEPENDENCY, False),
        (psycopg.InterfaceError("connection closed"), DEPENDENCY, False),
        (psycopg.IntegrityError("integrity"), DATA, True),
        (psycopg.DataError("bad data"), DATA, True),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_psycopg_errors_are_classified_by_sqlstate_and_class(exc, kind, permanent):
    assert_classified(exc, kind, permanent=permanent)


def test_a_postgres_deadlock_names_its_sqlstate():
    assert "40P01" in classify(psycopg.errors.DeadlockDetected()).reason


def test_an_unrecognised_psycopg_error_is_left_to_the_other_rules():
    assert_classified(psycopg.ProgrammingError("syntax error"), OTHER, permanent=False)


# -- Django -------------------------------------------------------------------------------------


def test_a_django_operational_error_is_a_dependency_failure():
    assert_classified(django.db.utils.OperationalError("server closed the connection"),
                      DEPENDENCY, permanent=False)


def test_a_django_interface_error_is_a_dependency_failure():
    assert_classified(django.db.utils.InterfaceError("connection already closed"),
                      DEPENDENCY, permanent=False)


def test_a_django_integrity_error_is_permanent_data_integrity():
    assert_classified(django.db.utils.IntegrityError("duplicate key"), DATA, permanent=True)


def test_a_django_data_error_is_permanent_data_integrity():
    assert_classified(django.db.utils.DataError("value too long"), DATA, permanent=True)


def test_a_django_operational_error_wrapping_a_deadlock_is_a_transient_timeout():
    exc = raised_from(django.db.utils.OperationalError("deadlock detected"),
                      psycopg.errors.DeadlockDetected("deadlock detected"))
    assert isinstance(exc.__cause__, psycopg.errors.DeadlockDetected)
    assert_classified(exc, TIMEOUT, permanent=False)


def test_a_django_operational_error_wrapping_a_serialization_failure_is_a_timeout():
    exc = raised_from(django.db.utils.OperationalError("could not serialize"),
                      psycopg.errors.SerializationFailure("could not serialize"))
    assert_classified(exc, TIMEOUT, permanent=False)


def test_a_django_integrity_error_wrapping_a_unique_violation_is_permanent():
    exc = raised_from(django.db.utils.IntegrityError("duplicate key"),
                      psycopg.errors.UniqueViolation("duplicate key"))
    assert_classified(exc, DATA, permanent=True)


def test_a_django_operational_error_wrapping_disk_full_is_resource_exhaustion():
    exc = raised_from(django.db.utils.OperationalError("could not extend file"),
                      psycopg.errors.DiskFull("could not extend file"))
    assert_classified(exc, EXHAUSTED, permanent=False)


def test_a_wrapped_error_with_a_psycopg2_style_pgcode_is_classified():
    class Psycopg2Style(Exception):
        pgcode = "40P01"

    exc = raised_from(django.db.utils.OperationalError("deadlock"), Psycopg2Style())
    assert_classified(exc, TIMEOUT, permanent=False)


@pytest.mark.django_db
def test_a_real_unique_violation_from_postgres_is_permanent_data_integrity():
    DeadLetter.objects.create(task_id="dup", task_name="t", fingerprint="f" * 40)
    with pytest.raises(django.db.utils.IntegrityError) as caught, transaction.atomic():
        DeadLetter.objects.create(task_id="dup", task_name="t", fingerprint="f" * 40)
    assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)
    failure = assert_classified(caught.value, DATA, permanent=True)
    assert "23505" in failure.reason


@pytest.mark.django_db
def test_a_real_division_by_zero_from_postgres_is_permanent_data_integrity():
    with pytest.raises(django.db.utils.DataError) as caught, transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
    assert_classified(caught.value, DATA, permanent=True)


@pytest.mark.django_db
def test_a_real_statement_timeout_from_postgres_is_a_transient_timeout():
    with pytest.raises(django.db.utils.OperationalError) as caught, transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = 10")
            cursor.execute("SELECT pg_sleep(2)")
    assert_classified(caught.value, TIMEOUT, permanent=False)


def test_a_validation_error_is_permanent_data_integrity():
    assert_classified(ValidationError("enter a valid email"), DATA, permanent=True)


def test_a_missing_object_is_transient_data_integrity():
    assert_classified(ObjectDoesNotExist("no such order"), DATA, permanent=False)
    assert_classified(DeadLetter.DoesNotExist("no such letter"), DATA, permanent=False)


# -- stdlib data errors -------------------------------------------------------------------------


def test_undecodable_json_is_permanent_data_integrity():
    with pytest.raises(json.JSONDecodeError) as caught:
        json.loads("{not json")
    assert_classified(caught.value, DATA, permanent=True)


def test_undecodable_bytes_are_permanent_data_integrity():
    with pytest.raises(UnicodeDecodeError) as caught:
        b"\xff\xfe\xfa".decode("utf-8")
    assert_classified(caught.value, DATA, permanent=True)


def test_a_builtin_timeout_is_a_transient_timeout():
    assert_classified(TimeoutError("timed out"), TIMEOUT, permanent=False)


@pytest.mark.parametrize("cls", [ConnectionError, ConnectionRefusedError, ConnectionResetError])
def test_a_builtin_connection_error_is_a_dependency_failure(cls):
    assert_classified(cls("refused"), DEPENDENCY, permanent=False)


# -- requests -----------------------------------------------------------------------------------


def requests_http_error(status, headers=None):
    response = requests.Response()
    response.status_code = status
    response.url = "https://api.example.test/charge"
    response.headers.update(headers or {})
    return requests.HTTPError(f"{status} error", response=response)


def test_requests_429_with_retry_after_is_resource_exhaustion_that_says_when():
    failure = assert_classified(requests_http_error(429, {"Retry-After": "7"}), EXHAUSTED,
                                permanent=False, retry_after=7.0)
    assert "429" in failure.reason


def test_requests_retry_after_header_is_case_insensitive():
    assert classify(requests_http_error(429, {"retry-after": "3"})).retry_after_seconds == 3.0


def test_requests_429_without_retry_after_has_no_delay():
    assert_classified(requests_http_error(429), EXHAUSTED, permanent=False, retry_after=None)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_requests_server_errors_are_transient_dependency_failures(status):
    assert_classified(requests_http_error(status), DEPENDENCY, permanent=False)


def test_requests_503_keeps_the_servers_retry_after():
    assert_classified(requests_http_error(503, {"Retry-After": "120"}), DEPENDENCY,
                      permanent=False, retry_after=120.0)


def test_requests_408_is_a_transient_dependency_failure():
    assert_classified(requests_http_error(408), DEPENDENCY, permanent=False)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_requests_client_errors_are_permanent_dependency_failures(status):
    assert_classified(requests_http_error(status, {"Retry-After": "5"}), DEPENDENCY,
                      permanent=True, retry_after=None)


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("connection refused"),
        requests.Timeout("timed out"),
        requests.ConnectTimeout("connect timed out"),
        requests.ReadTimeout("read timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_requests_connection_errors_and_timeouts_are_transient_dependency_failures(exc):
    assert_classified(exc, DEPENDENCY, permanent=False)


# -- httpx --------------------------------------------------------------------------------------


def httpx_status_error(status, headers=None):
    request = httpx.Request("GET", "https://api.example.test/charge")
    response = httpx.Response(status, headers=headers or {}, request=request)
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


def test_httpx_429_with_an_http_date_retry_after_is_a_positive_delay():
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    exc = httpx_status_error(429, {"Retry-After": format_datetime(when, usegmt=True)})
    failure = classify(exc)
    assert failure.kind is EXHAUSTED
    assert failure.permanent is False
    # HTTP dates have one-second resolution and the clock moves on while the test runs.
    assert 100.0 < failure.retry_after_seconds <= 120.0


def test_httpx_429_with_seconds_retry_after():
    assert_classified(httpx_status_error(429, {"Retry-After": "30"}), EXHAUSTED,
                      permanent=False, retry_after=30.0)


def test_httpx_503_is_a_transient_dependency_failure():
    assert_classified(httpx_status_error(503), DEPENDENCY, permanent=False)


def test_httpx_404_is_a_permanent_dependency_failure():
    assert_classified(httpx_status_error(404), DEPENDENCY, permanent=True)


@pytest.mark.parametrize(
    "cls",
    [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError],
)
def test_httpx_transport_errors_are_transient_dependency_failures(cls):
    request = httpx.Request("GET", "https://api.example.test/charge")
    assert_classified(cls("boom", request=request), DEPENDENCY, permanent=False)


# -- urllib -------------------------------------------------------------------------------------


def urllib_http_error(status, headers=None):
    message = email.message.Message()
    for name, value in (headers or {}).items():
        message[name] = value
    return urllib.error.HTTPError("https://api.example.test/", status, "status", message, None)


def test_urllib_429_with_retry_after_is_resource_exhaustion():
    assert_classified(urllib_http_error(429, {"Retry-After": "9"}), EXHAUSTED,
                      permanent=False, retry_after=9.0)


def test_urllib_503_is_a_transient_dependency_failure():
    assert_classified(urllib_http_error(503), DEPENDENCY, permanent=False)


def test_urllib_404_is_a_permanent_dependency_failure():
    assert_classified(urllib_http_error(404), DEPENDENCY, permanent=True)


def test_urllib_http_error_without_headers_is_classified():
    exc = urllib.error.HTTPError("https://api.example.test/", 502, "bad gateway", None, None)
    assert_classified(exc, DEPENDENCY, permanent=False)


def test_urllib_url_error_is_a_transient_dependency_failure():
    assert_classified(urllib.error.URLError("name resolution failed"), DEPENDENCY,
                      permanent=False)


# -- redis and kombu ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ConnectionError("connection refused"),
        redis.exceptions.TimeoutError("timed out"),
        redis.exceptions.BusyLoadingError("loading"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_redis_unavailability_is_a_transient_dependency_failure(exc):
    assert_classified(exc, DEPENDENCY, permanent=False)


def test_redis_out_of_memory_is_resource_exhaustion():
    exc = redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'")
    assert_classified(exc, EXHAUSTED, permanent=False)


def test_a_broker_outage_is_a_transient_dependency_failure():
    assert_classified(kombu.exceptions.OperationalError("broker down"), DEPENDENCY,
                      permanent=False)


# -- Celery time limits and resources -----------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [celery.exceptions.SoftTimeLimitExceeded, celery.exceptions.TimeLimitExceeded]
)
def test_celery_time_limits_are_transient_timeouts(cls):
    assert_classified(cls(), TIMEOUT, permanent=False)


def test_running_out_of_memory_is_resource_exhaustion():
    assert_classified(MemoryError(), EXHAUSTED, permanent=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE])
def test_a_full_disk_or_descriptor_table_is_resource_exhaustion(code):
    assert_classified(OSError(code, "no space left on device"), EXHAUSTED, permanent=False)


def test_an_ordinary_os_error_is_not_resource_exhaustion():
    assert_classified(OSError(errno.ENOENT, "no such file"), OTHER, permanent=False)


# -- the unknown, project rules, broken rules ---------------------------------------------------


class Mystery(Exception):
    pass


def test_an_unknown_exception_is_a_transient_other_failure():
    failure = assert_classified(Mystery("???"), OTHER, permanent=False)
    assert failure.reason == "unclassified"


def test_project_rules_are_asked_before_the_built_in_ones():
    def values_are_bad_data(exc):
        if isinstance(exc, ValueError):
            return Failure(DATA, True, None, "project: bad value")
        return None

    failure = classify(ValueError("bad amount"), rules=[values_are_bad_data])
    assert failure == Failure(DATA, True, None, "project: bad value")
    # Without the rule, a ValueError is unknown.
    assert classify(ValueError("bad amount")).kind is OTHER


def test_a_project_rule_can_override_a_built_in_classification():
    def timeouts_are_fatal_here(exc):
        if isinstance(exc, TimeoutError):
            return Failure(TIMEOUT, True, None, "project: no second chances")
        return None

    assert classify(TimeoutError()).permanent is False
    assert classify(TimeoutError(), rules=[timeouts_are_fatal_here]).permanent is True


def test_project_rules_are_asked_in_order():
    def first(exc):
        return Failure(DEPENDENCY, False, None, "first")

    def second(exc):
        return Failure(DATA, True, None, "second")

    assert classify(Mystery(), rules=[first, second]).reason == "first"
    assert classify(Mystery(), rules=[second, first]).reason == "second"


def test_a_rule_that_returns_none_defers_to_the_next():
    def no_opinion(exc):
        return None

    assert_classified(TimeoutError(), TIMEOUT, permanent=False)
    assert classify(TimeoutError(), rules=[no_opinion]) == classify(TimeoutError())


def test_a_rule_that_raises_is_skipped():
    def broken(exc):
        raise RuntimeError("bug in a project rule")

    def good(exc):
        return Failure(DEPENDENCY, True, None, "good rule")

    assert classify(Mystery(), rules=[broken, good]).reason == "good rule"
    assert_classified(Mystery(), OTHER, permanent=False)
    assert classify(TimeoutError(), rules=[broken]).kind is TIMEOUT


def test_project_rules_may_be_any_sequence_and_are_reusable():
    calls = []

    def counting(exc):
        calls.append(type(exc))
        return None

    rules = (counting,)
    classify(Mystery(), rules=rules)
    classify(Mystery(), rules=rules)
    assert calls == [Mystery, Mystery]


# -- the cause chain ----------------------------------------------------------------------------


def test_the_cause_chain_is_followed():
    exc = raised_from(Mystery("while charging"), TimeoutError("read timed out"))
    assert_classified(exc, TIMEOUT, permanent=False)


def test_the_implicit_context_is_followed():
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise Mystery("while handling")  # noqa: B904 - implicit context is the point
    except Mystery as caught:
        exc = caught
    assert_classified(exc, EXHAUSTED, permanent=False)


def test_raise_from_none_hides_the_context():
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise Mystery("clean") from None
    except Mystery as caught:
        exc = caught
    assert_classified(exc, OTHER, permanent=False)


def test_the_outer_exception_wins_over_its_cause():
    exc = raised_from(DependencyError("card declined", permanent=True), TimeoutError())
    assert_classified(exc, DEPENDENCY, permanent=True)


def test_project_rules_see_the_causes_too():
    class CardDeclined(Exception):
        pass

    def declined_is_permanent(exc):
        if isinstance(exc, CardDeclined):
            return Failure(DEPENDENCY, True, None, "declined")
        return None

    exc = raised_from(Mystery("charge failed"), CardDeclined())
    assert classify(exc, rules=[declined_is_permanent]).reason == "declined"


def test_a_cyclic_cause_chain_terminates():
    first, second = Mystery("a"), Mystery("b")
    first.__cause__ = second
    second.__cause__ = first
    assert_classified(first, OTHER, permanent=False)


def test_a_deep_wrapper_chain_still_finds_a_near_cause():
    exc = TimeoutError("root")
    for depth in range(5):
        exc = raised_from(Mystery(f"wrapper {depth}"), exc)
    assert_classified(exc, TIMEOUT, permanent=False)


def test_every_built_in_rule_ignores_foreign_exceptions():
    for rule in BUILTIN_RULES:
        assert rule(Mystery()) is None, rule.__name__


# -- Failure ------------------------------------------------------------------------------------


def test_a_failure_is_a_json_safe_value():
    failure = Failure(EXHAUSTED, False, 7.0, "HTTP 429")
    assert json.loads(json.dumps(failure.to_dict())) == {
        "kind": "resource_exhausted", "permanent": False, "retry_after_seconds": 7.0,
        "reason": "HTTP 429",
    }
    assert failure == Failure(EXHAUSTED, False, 7.0, "HTTP 429")
    with pytest.raises(AttributeError):
        failure.permanent = True  # type: ignore[misc]


# -- Retry-After --------------------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), (" 7 ", 7.0), ("0", 0.0), ("120", 120.0), (30, 30.0), ("1.5", 1.5)],
)
def test_retry_after_in_seconds(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_as_an_http_date():
    assert parse_retry_after("Sun, 01 Mar 2026 12:02:00 GMT", now=NOW) == 120.0


def test_retry_after_as_an_http_date_without_a_zone_is_utc():
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 -0000", now=NOW) == 30.0


def test_retry_after_with_an_offset_zone():
    assert parse_retry_after("Sun, 01 Mar 2026 13:01:00 +0100", now=NOW) == 60.0


def test_retry_after_defaults_to_the_current_time():
    when = datetime.now(timezone.utc) + timedelta(seconds=60)
    assert 50.0 < parse_retry_after(format_datetime(when, usegmt=True)) <= 60.0


@pytest.mark.parametrize("value", ["-5", "-0.5"])
def test_negative_retry_after_is_clamped_to_zero(value):
    assert parse_retry_after(value, now=NOW) == 0.0


def test_a_retry_after_date_in_the_past_is_clamped_to_zero():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "tomorrow at noon", "Sun, 99 Foo 2026", "7 seconds",
     "inf", "-inf", "Infinity", "nan", "NaN"],
)
def test_garbage_retry_after_is_ignored(value):
    assert parse_retry_after(value, now=NOW) is None


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(min_value=0, max_value=10**9))
def test_any_delta_seconds_parses_to_itself(seconds):
    assert parse_retry_after(str(seconds), now=NOW) == float(seconds)


@settings(max_examples=200, deadline=None)
@given(
    when=st.datetimes(
        min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1),
        timezones=st.just(timezone.utc),
    )
)
def test_any_http_date_parses_to_the_seconds_until_it_or_zero(when):
    when = when.replace(microsecond=0)
    expected = max(0.0, (when - NOW).total_seconds())
    assert parse_retry_after(format_datetime(when, usegmt=True), now=NOW) == expected


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=40))
def test_any_header_value_gives_none_or_a_finite_non_negative_delay(value):
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0.0)
