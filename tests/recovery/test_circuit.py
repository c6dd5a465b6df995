"""recovery.workflows.circuit: the breaker's state machine on a fake clock, its policy, the real shared
stores (Redis and PostgreSQL) under concurrent writers, failing open, and CircuitOpenError
crossing process boundaries."""

from __future__ import annotations

import copy
import pickle
import threading
import uuid

import pytest
import requests
from celery import Celery
from django.db import connection

from recovery.workflows import circuit as circuit_module
from recovery.workflows.circuit import (CLOSED, HALF_OPEN, OPEN, Circuit, CircuitOpenError, CircuitPolicy, guard, policy_for)
from recovery.core.classification import classify
from recovery.core.errors import (DataIntegrityError, DependencyError, ResourceExhaustedError, TimeoutOrDeadlockError)
from recovery.core.kinds import FailureKind
from recovery.workflows.shared_state import KEY_PREFIX, DatabaseStore, RedisStore

REDIS_URL = "redis://127.0.0.1:6379/6"
UNREACHABLE = "redis://127.0.0.1:1/0"

POLICY = CircuitPolicy(failure_rate_threshold=0.5, minimum_calls=4, window_seconds=10,
                       open_seconds=5, half_open_max_calls=2)


class Clock:
    """A clock the test moves by hand: nothing sleeps."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryStore:
    """The Store protocol on a dict (each update sees a copy, as a real store would)."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}

    def get(self, key: str) -> dict:
        return copy.deepcopy(self.records.get(key, {}))

    def update(self, key: str, change):
        record = copy.deepcopy(self.records.get(key, {}))
        result = change(record)
        self.records[key] = record
        return result


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def breaker(clock):
    return Circuit("payments-api", POLICY, store=MemoryStore(), clock=clock)


def calls(breaker: Circuit, *outcomes: bool) -> None:
    for ok in outcomes:
        assert breaker.allow().allowed
        breaker.record(ok)


def open_it(breaker: Circuit) -> None:
    calls(breaker, True, True, False, False)
    assert breaker.state()["state"] == OPEN


# -- closed -> open -------------------------------------------------------------------------------


def test_a_new_circuit_is_closed_and_lets_calls_through(breaker):
    decision = breaker.allow()
    assert decision.allowed and decision.state == CLOSED and not decision.trial
    assert breaker.state()["state"] == CLOSED


def test_failures_below_minimum_calls_never_open_it(breaker):
    # Given a dependency failing every call, but fewer calls than minimum_calls
    calls(breaker, False, False, False)
    # Then the circuit stays closed: three out of three is not yet an outage
    assert breaker.state()["state"] == CLOSED
    # And the fourth failure (4 calls, 100% failed) opens it
    calls(breaker, False)
    assert breaker.state()["state"] == OPEN


def test_it_opens_when_the_failure_rate_reaches_the_threshold(breaker, clock):
    calls(breaker, True, True, False)
    assert breaker.state()["state"] == CLOSED
    calls(breaker, False)  # 2 of 4 failed = 0.5 >= 0.5
    record = breaker.state()
    assert record["state"] == OPEN
    assert record["open_until"] == pytest.approx(clock.now + POLICY.open_seconds)
    assert record["opened"] == 1


def test_a_failure_rate_below_the_threshold_keeps_it_closed(breaker):
    calls(breaker, True, True, True, False, True, True, False)  # 2 of 7
    assert breaker.state()["state"] == CLOSED


def test_a_success_never_opens_it_even_above_the_threshold(breaker):
    calls(breaker, False, False, False)
    calls(breaker, True)  # 3 of 4 failed, but the last call worked
    assert breaker.state()["state"] == CLOSED


def test_failures_older_than_the_window_are_forgotten(breaker, clock):
    # Given three failures, then a quiet spell longer than the window
    calls(breaker, False, False, False)
    clock.advance(POLICY.window_seconds + 0.5)
    # When one more call fails
    calls(breaker, False)
    # Then only one call is in the window: below minimum_calls, still closed
    record = breaker.state()
    assert record["state"] == CLOSED
    assert sum(v[0] for v in record["buckets"].values()) == 1


def test_failures_inside_the_window_add_up(breaker, clock):
    calls(breaker, False, False, False)
    clock.advance(POLICY.window_seconds * 0.8)
    calls(breaker, False)
    assert breaker.state()["state"] == OPEN


# -- open -> half-open -> closed | open ----------------------------------------------------------


def test_an_open_circuit_refuses_calls_and_says_when_to_come_back(breaker, clock):
    open_it(breaker)
    clock.advance(2)
    decision = breaker.allow()
    assert not decision.allowed and decision.state == OPEN
    assert decision.retry_in_seconds == pytest.approx(POLICY.open_seconds - 2)


def test_after_open_seconds_a_limited_number_of_trial_calls_go_through(breaker, clock):
    open_it(breaker)
    clock.advance(POLICY.open_seconds)
    first, second, third = breaker.allow(), breaker.allow(), breaker.allow()
    assert first.allowed and first.trial and first.state == HALF_OPEN
    assert second.allowed and second.trial
    assert not third.allowed and third.state == HALF_OPEN and third.retry_in_seconds > 0
    assert breaker.state()["state"] == HALF_OPEN


def test_it_closes_only_when_every_trial_succeeded(breaker, clock):
    open_it(breaker)
    clock.advance(POLICY.open_seconds)
    assert breaker.allow().trial and breaker.allow().trial
    breaker.record(True)
    assert breaker.state()["state"] == HALF_OPEN  # one of two trials so far
    breaker.record(True)
    record = breaker.state()
    assert record["state"] == CLOSED and record["buckets"] == {}
    # And closed again means calls flow without permits
    assert all(breaker.allow().allowed for _ in range(10))


def test_a_failed_trial_opens_it_again_for_another_open_seconds(breaker, clock):
    open_it(breaker)
    clock.advance(POLICY.open_seconds + 1)
    assert breaker.allow().trial
    breaker.record(False)
    record = breaker.state()
    assert record["state"] == OPEN and record["opened"] == 2
    assert record["open_until"] == pytest.approx(clock.now + POLICY.open_seconds)
    assert not breaker.allow().allowed


def test_a_lost_trial_permit_is_handed_out_again_after_open_seconds(breaker, clock):
    # Given a half-open circuit whose two trial permits went to workers that died
    open_it(breaker)
    clock.advance(POLICY.open_seconds)
    assert breaker.allow().trial and breaker.allow().trial
    assert not breaker.allow().allowed
    # When open_seconds pass without any trial reporting
    clock.advance(POLICY.open_seconds + 0.1)
    # Then the permits are handed out again, and a successful round closes it
    assert breaker.allow().trial and breaker.allow().trial
    assert not breaker.allow().allowed
    breaker.record(True)
    breaker.record(True)
    assert breaker.state()["state"] == CLOSED


def test_an_outcome_reported_while_open_changes_nothing(breaker, clock):
    open_it(breaker)
    before = breaker.state()
    breaker.record(True)  # a call let through before it opened
    breaker.record(False)
    assert breaker.state() == before


# -- what counts as a failure ----------------------------------------------------------------------


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} from partner", response=response)


@pytest.mark.parametrize("exc", [
    DependencyError("payments API answered 503"),
    TimeoutOrDeadlockError("read timed out"),
    TimeoutError("timed out"),
    ConnectionRefusedError("refused"),
    requests.ConnectionError("connection refused"),
    _http_error(503),
    _http_error(500),
])
def test_transient_dependency_and_timeout_failures_count_against_the_dependency(breaker, exc):
    for _ in range(POLICY.minimum_calls):
        assert breaker.allow().allowed
        breaker.record_exception(exc)
    assert breaker.state()["state"] == OPEN


@pytest.mark.parametrize("exc", [
    DependencyError("card declined", permanent=True),  # the dependency answered: no
    _http_error(404),
    _http_error(422),
    DataIntegrityError("row has no email"),
    ResourceExhaustedError("429 rate limited", retry_after_seconds=3),
    ValueError("a bug in the task"),
])
def test_answers_and_other_errors_count_as_successful_calls(breaker, exc):
    for _ in range(POLICY.minimum_calls * 2):
        assert breaker.allow().allowed
        breaker.record_exception(exc)
    record = breaker.state()
    assert record["state"] == CLOSED
    assert sum(v[1] for v in record["buckets"].values()) == 0


def test_a_task_specific_classifier_decides_what_counts(breaker):
    def everything_is_an_outage(exc):
        return classify(DependencyError(str(exc)))

    for _ in range(POLICY.minimum_calls):
        breaker.record_exception(ValueError("odd"), classify=everything_is_an_outage)
    assert breaker.state()["state"] == OPEN


# -- operators: reset and trip ---------------------------------------------------------------------


def test_reset_closes_an_open_circuit_and_forgets_its_window(breaker):
    open_it(breaker)
    breaker.reset()
    record = breaker.state()
    assert record["state"] == CLOSED and "buckets" not in record
    assert breaker.allow().allowed


def test_trip_opens_it_for_the_given_seconds(breaker, clock):
    breaker.trip(seconds=120)
    record = breaker.state()
    assert record["state"] == OPEN and record["open_until"] == pytest.approx(clock.now + 120)
    clock.advance(POLICY.open_seconds + 1)  # the policy's open_seconds do not apply
    assert not breaker.allow().allowed
    clock.advance(120)
    assert breaker.allow().trial


def test_trip_without_seconds_uses_open_seconds(breaker, clock):
    breaker.trip()
    assert breaker.state()["open_until"] == pytest.approx(clock.now + POLICY.open_seconds)


# -- the policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "fragment"), [
    ({"failure_rate_threshold": 0}, "failure_rate_threshold must be in (0, 1]"),
    ({"failure_rate_threshold": 1.5}, "failure_rate_threshold must be in (0, 1]"),
    ({"minimum_calls": 0}, "at least 1"),
    ({"half_open_max_calls": 0}, "at least 1"),
    ({"window_seconds": 0}, "must be positive"),
    ({"open_seconds": -1}, "must be positive"),
    ({"open_secs": 3}, "unknown circuit policy fields ['open_secs']"),
])
def test_a_bad_circuit_policy_is_refused_with_a_plain_message(values, fragment):
    with pytest.raises(ValueError) as raised:
        CircuitPolicy.from_dict(values)
    assert fragment in str(raised.value)


def test_the_policy_comes_from_settings_by_name_then_default(settings):
    settings.RECOVERY = {**settings.RECOVERY, "CIRCUITS": {
        "payments-api": {"minimum_calls": 7},
        "maps": CircuitPolicy(open_seconds=9),
        "default": {"window_seconds": 15},
    }}
    assert policy_for("payments-api") == CircuitPolicy(minimum_calls=7)
    assert policy_for("maps") == CircuitPolicy(open_seconds=9)
    assert policy_for("anything-else") == CircuitPolicy(window_seconds=15)
    settings.RECOVERY = {**settings.RECOVERY, "CIRCUITS": {}}
    assert policy_for("anything-else") == CircuitPolicy()


# -- guard() ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_state(settings):
    """Shared state on the test Redis db 6; this test's keys removed afterwards."""
    import redis

    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": REDIS_URL}
    client = redis.Redis.from_url(REDIS_URL)
    names: list[str] = []

    def name(prefix: str = "dep") -> str:
        value = f"{prefix}-{uuid.uuid4().hex[:10]}"
        names.append(value)
        return value

    yield name
    for value in names:
        client.delete(f"{KEY_PREFIX}circuit:{value}")


def test_guard_counts_the_block_and_refuses_it_while_open(redis_state, settings):
    name = redis_state()
    settings.RECOVERY = {**settings.RECOVERY, "CIRCUITS": {name: {"minimum_calls": 2}}}
    with guard(name):
        pass
    for _ in range(3):
        with pytest.raises(DependencyError), guard(name):
            raise DependencyError("503")
    assert Circuit(name).state()["state"] == OPEN
    ran = []
    with pytest.raises(CircuitOpenError) as refused, guard(name):
        ran.append(True)
    assert ran == []
    assert refused.value.dependency == name and refused.value.retry_after_seconds > 0


# -- the real stores -------------------------------------------------------------------------------


@pytest.fixture(params=["redis", pytest.param("postgres",
                                               marks=pytest.mark.django_db(transaction=True))])
def real_store(request, redis_state):
    return RedisStore(REDIS_URL) if request.param == "redis" else DatabaseStore()


def test_the_state_machine_runs_the_same_on_the_real_stores(real_store, redis_state, clock):
    breaker = Circuit(redis_state(), POLICY, store=real_store, clock=clock)
    open_it(breaker)
    assert not breaker.allow().allowed
    clock.advance(POLICY.open_seconds)
    assert breaker.allow().trial and breaker.allow().trial and not breaker.allow().allowed
    breaker.record(True)
    breaker.record(True)
    assert breaker.state()["state"] == CLOSED
    # And a second Circuit object (another worker) reads the same state
    other_store = RedisStore(REDIS_URL) if isinstance(real_store, RedisStore) else DatabaseStore()
    other = Circuit(breaker.name, POLICY, store=other_store, clock=clock)
    assert other.state() == breaker.state()


def test_concurrent_writers_lose_no_calls(real_store, redis_state, clock):
    # Given one circuit with a high minimum_calls, so it stays closed and counts every call
    name = redis_state()
    policy = CircuitPolicy(minimum_calls=10_000, window_seconds=600)
    threads_n, per_thread = 6, 25

    def hammer(index: int) -> None:
        try:
            breaker = Circuit(name, policy, store=real_store, clock=clock)
            for n in range(per_thread):
                breaker.record(ok=(n + index) % 2 == 0)
        finally:
            connection.close()

    # When six threads record calls at once
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then every call is in the window
    record = Circuit(name, policy, store=real_store, clock=clock).state()
    assert sum(v[0] for v in record["buckets"].values()) == threads_n * per_thread
    expected_failures = sum(1 for i in range(threads_n) for n in range(per_thread) if (n + i) % 2)
    assert sum(v[1] for v in record["buckets"].values()) == expected_failures


def test_concurrent_trials_get_exactly_the_permitted_number(real_store, redis_state, clock):
    # Given an open circuit whose open_seconds have passed
    name = redis_state()
    breaker = Circuit(name, POLICY, store=real_store, clock=clock)
    open_it(breaker)
    clock.advance(POLICY.open_seconds)
    granted: list[bool] = []
    lock = threading.Lock()

    def ask() -> None:
        try:
            decision = Circuit(name, POLICY, store=real_store, clock=clock).allow()
            with lock:
                granted.append(decision.allowed)
        finally:
            connection.close()

    # When eight workers ask at once
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then exactly half_open_max_calls trials went through
    assert granted.count(True) == POLICY.half_open_max_calls


def test_the_database_store_keeps_one_row_per_key(transactional_db, clock):
    from recovery.models import SharedState

    breaker = Circuit("db-only", POLICY, store=DatabaseStore(), clock=clock)
    open_it(breaker)
    row = SharedState.objects.get(key="circuit:db-only")
    assert row.value["state"] == OPEN
    assert SharedState.objects.count() == 1


# -- an unreachable store fails open ---------------------------------------------------------------


def test_an_unreachable_store_lets_calls_through_and_records_nothing(clock, caplog):
    breaker = Circuit("payments-api", POLICY, store=RedisStore(UNREACHABLE), clock=clock)
    decision = breaker.allow()
    assert decision.allowed and decision.state == CLOSED
    breaker.record(False)  # does not raise
    breaker.record_exception(DependencyError("503"))
    assert "shared state unreachable" in caplog.text
    # Operators asking for the state get the error, not a made-up "closed"
    with pytest.raises(Exception, match="(?i)connect"):
        breaker.state()


def test_an_unreachable_store_from_settings_fails_open_too(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": UNREACHABLE}
    with guard("payments-api"):
        pass
    assert Circuit("payments-api").allow().allowed


# -- CircuitOpenError across processes -------------------------------------------------------------


def test_circuit_open_error_survives_pickle():
    error = CircuitOpenError("payments-api", 12.5)
    copy_ = pickle.loads(pickle.dumps(error))
    assert type(copy_) is CircuitOpenError
    assert copy_.dependency == "payments-api" and copy_.retry_after_seconds == 12.5
    assert str(copy_) == str(error) == "circuit for 'payments-api' is open; retry in 12.5s"


def test_circuit_open_error_survives_celerys_json_result_serialization():
    app = Celery("unit", set_as_current=False, backend="cache+memory://")
    app.conf.result_serializer = "json"
    backend = app.backend
    stored = backend.encode(backend.prepare_exception(CircuitOpenError("payments-api", 3.0)))
    error = backend.exception_to_python(backend.decode(stored))
    assert type(error) is CircuitOpenError
    assert error.dependency == "payments-api" and error.retry_after_seconds == 3.0
    assert "payments-api" in str(error)


def test_circuit_open_error_is_a_transient_dependency_failure_with_its_retry_after():
    failure = classify(CircuitOpenError("payments-api", 4.0))
    assert failure.kind is FailureKind.DEPENDENCY and not failure.permanent
    assert failure.retry_after_seconds == 4.0


def test_the_module_exports_what_it_documents():
    assert {"CircuitPolicy", "Circuit", "CircuitOpenError", "guard"} <= set(circuit_module.__all__)


def test_window_counts_report_the_calls_still_in_the_window(breaker, clock):
    from recovery.workflows.circuit import window_counts

    calls(breaker, True, False)
    clock.advance(POLICY.window_seconds / 2)
    calls(breaker, False)
    assert window_counts(breaker.state(), clock.now, POLICY) == (3, 2)
    clock.advance(POLICY.window_seconds / 2 + 0.5)
    assert window_counts(breaker.state(), clock.now, POLICY) == (1, 1)
    clock.advance(POLICY.window_seconds)
    assert window_counts(breaker.state(), clock.now, POLICY) == (0, 0)


def test_another_circuits_refusal_counts_as_nothing(breaker):
    # Given a task on this dependency whose code guards a second one, which is open
    for _ in range(POLICY.minimum_calls * 2):
        breaker.record_exception(CircuitOpenError("maps-api", 10.0))
    # Then no call to this dependency was made, and none is counted
    record = breaker.state()
    assert record["state"] == CLOSED and not record.get("buckets")


# -- the closed count as a Redis script ------------------------------------------------------------


def test_the_redis_script_counts_and_opens_exactly_as_the_state_machine(redis_state, clock):
    # Given the same calls on a circuit in memory (the Python state machine) and on Redis
    # (the closed state counted by the Lua script), over two windows' worth of buckets
    memory = Circuit("same", POLICY, store=MemoryStore(), clock=clock)
    on_redis = Circuit(redis_state(), POLICY, store=RedisStore(REDIS_URL), clock=clock)
    for step, ok in enumerate([True, False, True, True, True, False, True, True, False, False,
                               True, False, False]):
        for breaker in (memory, on_redis):
            if breaker.allow().allowed:
                breaker.record(ok)
        clock.advance(1.7 if step % 3 else 0.4)
        # Then after every call both hold the same record (Redis's cjson writes numbers to
        # 14 significant digits: a tenth of a millisecond for a Unix time)
        assert _rounded(on_redis.state()) == _rounded(memory.state()), step
    assert memory.state()["state"] == OPEN and memory.state()["opened"] == 1


def _rounded(record: dict) -> dict:
    return {key: round(value, 3) if isinstance(value, float) else value
            for key, value in record.items()}


# Each hammer is a fresh interpreter, as a worker process is: forking the test process,
# which holds threads and connection pools, can inherit a lock held mid-operation and hang.
_HAMMER = """
import json
import sys
from recovery.workflows.circuit import Circuit, CircuitPolicy
from recovery.workflows.shared_state import RedisStore

url, name, index, calls, clock, mode = sys.argv[1:7]
policy = CircuitPolicy(**json.loads(sys.argv[7]))
breaker = Circuit(name, policy, store=RedisStore(url), clock=lambda: float(clock))
for n in range(int(calls)):
    breaker.record(ok=False if mode == "fail" else (n + int(index)) % 3 != 0)
"""


def _run_hammers(name: str, policy_kwargs: dict, processes_n: int, calls: int, clock: float,
                 mode: str) -> None:
    """Start the hammers together, wait for each, kill any left after a minute."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    processes = [subprocess.Popen([sys.executable, "-c", _HAMMER, REDIS_URL, name, str(i), str(calls),
                                   str(clock), mode, json.dumps(policy_kwargs)], cwd=root)
                 for i in range(processes_n)]
    codes = []
    try:
        for process in processes:
            codes.append(process.wait(timeout=60))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert codes == [0] * processes_n


def test_eight_processes_counting_one_hot_circuit_lose_no_call(redis_state):
    # Given one closed circuit whose threshold no mix of these calls reaches
    name = redis_state()
    policy_kwargs = dict(failure_rate_threshold=0.9, minimum_calls=10, window_seconds=600)
    policy = CircuitPolicy(**policy_kwargs)
    processes_n, per_process = 8, 200
    # When eight worker processes count calls on it at once
    _run_hammers(name, policy_kwargs, processes_n, per_process, 2_000_000.0, "mixed")
    # Then every call is in the window: none lost to a concurrent write
    record = Circuit(name, policy, store=RedisStore(REDIS_URL)).state()
    assert record["state"] == CLOSED
    assert sum(v[0] for v in record["buckets"].values()) == processes_n * per_process
    assert sum(v[1] for v in record["buckets"].values()) == sum(
        1 for i in range(processes_n) for n in range(per_process) if (n + i) % 3 == 0)


def test_eight_processes_failing_at_once_open_the_circuit_once(redis_state):
    name = redis_state()
    policy_kwargs = dict(failure_rate_threshold=0.5, minimum_calls=20, window_seconds=600,
                         open_seconds=600)
    policy = CircuitPolicy(**policy_kwargs)
    _run_hammers(name, policy_kwargs, 8, 50, 3_000_000.0, "fail")
    record = Circuit(name, policy, store=RedisStore(REDIS_URL)).state()
    assert record["state"] == OPEN and record["opened"] == 1
