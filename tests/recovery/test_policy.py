"""recovery.core.policy: RetryPolicy validation, serialisation, merging and decisions; Verdict."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.core.backoff import Jitter
from recovery.core.classification import Failure
from recovery.core.errors import DependencyError, PermanentError
from recovery.core.kinds import FailureKind
from recovery.core.policy import Action, Attempt, RetryPolicy, Verdict

ALL_JITTERS = [j.value for j in Jitter]
ALL_KINDS = [k.value for k in FailureKind]

TRANSIENT = Failure(FailureKind.OTHER, permanent=False, reason="unclassified")
DEPENDENCY = Failure(FailureKind.DEPENDENCY, permanent=False, reason="HTTP 503")
EXHAUSTED = Failure(FailureKind.RESOURCE_EXHAUSTED, permanent=False, reason="HTTP 429")
PERMANENT = Failure(FailureKind.DATA_INTEGRITY, permanent=True, reason="validation error")


class CardDeclined(Exception):
    """Module level so it has an importable dotted path."""


class SoftDecline(CardDeclined):
    pass


def lowest(a, b):
    return a


def highest(a, b):
    return b


def fixed_uniform(fraction: float):
    def uniform(a: float, b: float) -> float:
        return min(b, max(a, a + (b - a) * fraction))

    return uniform


def history(n, delay=1.0):
    return [Attempt(delay) for _ in range(n)]


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, r"max_attempts must be an integer >= 1 \(got 0\)"),
        ({"max_attempts": -3}, r"max_attempts must be an integer >= 1"),
        ({"max_attempts": 2.5}, r"max_attempts must be an integer >= 1"),
        ({"max_attempts": "5"}, r"max_attempts must be an integer >= 1"),
        ({"initial_delay_seconds": -1}, r"initial_delay_seconds must be a finite number >= 0 \(got -1\)"),
        ({"max_delay_seconds": -0.5}, r"max_delay_seconds must be a finite number >= 0"),
        ({"initial_delay_seconds": "1"}, r"initial_delay_seconds must be a finite number >= 0"),
        ({"multiplier": 0.5}, r"multiplier must be a finite number >= 1 \(got 0.5\)"),
        ({"multiplier": 0}, r"multiplier must be a finite number >= 1"),
        ({"initial_delay_seconds": float("nan")}, r"initial_delay_seconds must be a finite number"),
        ({"max_delay_seconds": float("inf")}, r"max_delay_seconds must be a finite number"),
        ({"multiplier": float("nan")}, r"multiplier must be a finite number >= 1"),
        ({"max_elapsed_seconds": float("nan")}, r"max_elapsed_seconds must be a positive number"),
        ({"initial_delay_seconds": 10, "max_delay_seconds": 5},
         r"max_delay_seconds \(5\) is below initial_delay_seconds \(10\); raise the cap or "
         r"lower the initial delay"),
        ({"jitter": "gaussian"},
         r"jitter must be one of 'none', 'full', 'equal', 'decorrelated' \(got 'gaussian'\)"),
        ({"max_elapsed_seconds": 0}, r"max_elapsed_seconds must be a positive number or None"),
        ({"max_elapsed_seconds": -10}, r"max_elapsed_seconds must be a positive number or None"),
        ({"per_kind": {"network": {"max_attempts": 3}}},
         r"per_kind key 'network' is not a failure kind \(dependency, data_integrity, "
         r"resource_exhausted, timeout, poison, other\)"),
        ({"per_kind": {"dependency": {"retries": 3}}},
         r"per_kind\['dependency'\] has unknown fields \['retries'\]; allowed: "),
        ({"per_kind": {"dependency": {"non_retryable": ["builtins.ValueError"]}}},
         r"per_kind\['dependency'\] has unknown fields \['non_retryable'\]"),
        ({"per_kind": {"timeout": {"max_attempts": 0}}}, r"max_attempts must be an integer >= 1"),
        ({"per_kind": {"timeout": {"max_delay_seconds": 0.5}}},
         r"max_delay_seconds \(0.5\) is below initial_delay_seconds \(1.0\)"),
        ({"per_kind": {"timeout": {"jitter": "wild"}}}, r"jitter must be one of"),
        ({"non_retryable": ["myapp.errors.NoSuchError"]},
         r"non_retryable entry 'myapp.errors.NoSuchError' cannot be imported .*use a dotted "
         r"path such as 'myapp.errors.CardDeclined'"),
        ({"non_retryable": ["builtins.NoSuchError"]}, r"'builtins.NoSuchError' cannot be imported"),
        ({"non_retryable": ["ValueError"]}, r"'ValueError' cannot be imported"),
        ({"non_retryable": ["builtins.len"]}, r"entry <built-in function len> is not an exception class"),
        ({"non_retryable": [int]}, r"is not an exception class"),
    ],
)
def test_invalid_policies_are_rejected_with_a_helpful_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_the_defaults_are_documented_values():
    policy = RetryPolicy()
    assert policy.max_attempts == 5
    assert policy.initial_delay_seconds == 1.0
    assert policy.multiplier == 2.0
    assert policy.max_delay_seconds == 300.0
    assert policy.jitter is Jitter.FULL
    assert policy.max_elapsed_seconds is None
    assert policy.non_retryable == ()
    assert dict(policy.per_kind) == {}


def test_jitter_strings_become_the_enum():
    assert RetryPolicy(jitter="decorrelated").jitter is Jitter.DECORRELATED


def test_a_cap_equal_to_the_initial_delay_is_valid():
    assert RetryPolicy(initial_delay_seconds=5, max_delay_seconds=5).max_delay_seconds == 5


def test_non_retryable_dotted_paths_are_imported():
    policy = RetryPolicy(non_retryable=["builtins.KeyError", f"{__name__}.CardDeclined",
                                        DependencyError])
    assert policy.non_retryable == (KeyError, CardDeclined, DependencyError)


def test_per_kind_keys_become_failure_kinds():
    policy = RetryPolicy(per_kind={"resource_exhausted": {"max_attempts": 10},
                                   FailureKind.TIMEOUT: {"jitter": "none"}})
    assert set(policy.per_kind) == {FailureKind.RESOURCE_EXHAUSTED, FailureKind.TIMEOUT}
    assert all(isinstance(kind, FailureKind) for kind in policy.per_kind)


def test_per_kind_may_be_given_as_a_policy():
    policy = RetryPolicy(per_kind={"timeout": RetryPolicy(max_attempts=9, jitter="none")})
    overrides = policy.per_kind[FailureKind.TIMEOUT]
    assert overrides["max_attempts"] == 9
    assert overrides["jitter"] is Jitter.NONE


def test_a_policy_is_immutable():
    policy = RetryPolicy(per_kind={"timeout": {"max_attempts": 9}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.per_kind[FailureKind.DEPENDENCY] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        policy.per_kind[FailureKind.TIMEOUT]["max_attempts"] = 1  # type: ignore[index]


def test_the_callers_per_kind_dict_is_copied():
    overrides = {"timeout": {"max_attempts": 9}}
    policy = RetryPolicy(per_kind=overrides)
    overrides["timeout"]["max_attempts"] = 2
    overrides["dependency"] = {"max_attempts": 1}
    assert dict(policy.per_kind) == {FailureKind.TIMEOUT: {"max_attempts": 9}}


# -- serialisation ------------------------------------------------------------------------------

NON_RETRYABLE_PATHS = [
    "builtins.ValueError",
    "builtins.KeyError",
    "json.decoder.JSONDecodeError",
    "recovery.core.errors.PermanentError",
    "recovery.core.errors.DependencyError",
    f"{__name__}.CardDeclined",
]

delays = st.floats(min_value=0.0, max_value=500.0, allow_nan=False, allow_infinity=False)
caps_above = st.floats(min_value=0.0, max_value=5_000.0, allow_nan=False, allow_infinity=False)
multipliers = st.floats(min_value=1.0, max_value=10.0, allow_nan=False, allow_infinity=False) | \
    st.integers(min_value=1, max_value=10)
elapsed_limits = st.none() | st.floats(min_value=0.001, max_value=1e7, allow_nan=False,
                                       allow_infinity=False)


@st.composite
def overrides_for(draw, base_initial):
    chosen = {}
    if draw(st.booleans()):
        chosen["max_attempts"] = draw(st.integers(min_value=1, max_value=50))
    if draw(st.booleans()):
        chosen["multiplier"] = draw(multipliers)
    if draw(st.booleans()):
        chosen["jitter"] = draw(st.sampled_from(ALL_JITTERS))
    if draw(st.booleans()):
        chosen["max_elapsed_seconds"] = draw(elapsed_limits)
    if draw(st.booleans()):
        initial = draw(delays)
        chosen["initial_delay_seconds"] = initial
        chosen["max_delay_seconds"] = initial + draw(caps_above)
    elif draw(st.booleans()):
        chosen["max_delay_seconds"] = base_initial + draw(caps_above)
    return chosen


@st.composite
def policy_fields(draw):
    initial = draw(delays)
    data = {
        "max_attempts": draw(st.integers(min_value=1, max_value=50)),
        "initial_delay_seconds": initial,
        "multiplier": draw(multipliers),
        "max_delay_seconds": initial + draw(caps_above),
        "jitter": draw(st.sampled_from(ALL_JITTERS)),
        "max_elapsed_seconds": draw(elapsed_limits),
        "non_retryable": draw(st.lists(st.sampled_from(NON_RETRYABLE_PATHS), unique=True,
                                       max_size=3)),
        "per_kind": draw(st.dictionaries(st.sampled_from(ALL_KINDS), overrides_for(initial),
                                         max_size=3)),
    }
    return data


@settings(max_examples=150, deadline=None)
@given(fields=policy_fields())
def test_to_dict_and_from_dict_round_trip(fields):
    policy = RetryPolicy.from_dict(fields)
    data = policy.to_dict()
    assert RetryPolicy.from_dict(data) == policy
    # It is JSON-safe: it survives a message header or the settings file.
    through_json = json.loads(json.dumps(data, allow_nan=False))
    assert RetryPolicy.from_dict(through_json) == policy
    assert RetryPolicy.from_dict(through_json).to_dict() == through_json


@settings(max_examples=100, deadline=None)
@given(fields=policy_fields())
def test_to_dict_keeps_every_field_value(fields):
    data = RetryPolicy.from_dict(fields).to_dict()
    assert data["max_attempts"] == fields["max_attempts"]
    assert data["initial_delay_seconds"] == fields["initial_delay_seconds"]
    assert data["multiplier"] == fields["multiplier"]
    assert data["max_delay_seconds"] == fields["max_delay_seconds"]
    assert data["jitter"] == fields["jitter"]
    assert data["max_elapsed_seconds"] == fields["max_elapsed_seconds"]
    assert data["per_kind"] == fields["per_kind"]
    assert data["non_retryable"] == fields["non_retryable"]  # all canonical dotted paths


def test_non_retryable_classes_serialise_as_dotted_paths():
    policy = RetryPolicy(non_retryable=[ValueError, CardDeclined, "recovery.core.errors.PermanentError"])
    data = policy.to_dict()
    assert data["non_retryable"] == [
        "builtins.ValueError", f"{__name__}.CardDeclined", "recovery.core.errors.PermanentError",
    ]
    assert RetryPolicy.from_dict(data).non_retryable == (ValueError, CardDeclined, PermanentError)


def test_per_kind_serialises_with_kind_names():
    policy = RetryPolicy(per_kind={FailureKind.RESOURCE_EXHAUSTED: {"max_delay_seconds": 3600}})
    assert policy.to_dict()["per_kind"] == {"resource_exhausted": {"max_delay_seconds": 3600}}


def test_from_dict_accepts_a_partial_dict():
    assert RetryPolicy.from_dict({"max_attempts": 2}) == RetryPolicy(max_attempts=2)
    assert RetryPolicy.from_dict({}) == RetryPolicy()


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown RetryPolicy fields \['max_retries'\]; "
                                         r"allowed: \["):
        RetryPolicy.from_dict({"max_attempts": 3, "max_retries": 3})


def test_from_dict_validates_the_values():
    with pytest.raises(ValueError, match="multiplier must be a finite number >= 1"):
        RetryPolicy.from_dict({"multiplier": 0.1})


# -- merged ---------------------------------------------------------------------------------------


def test_merged_applies_a_per_call_override():
    base = RetryPolicy(max_attempts=5, initial_delay_seconds=2.0, jitter="equal",
                       non_retryable=[CardDeclined],
                       per_kind={"timeout": {"max_attempts": 9}})
    merged = base.merged({"max_attempts": 2, "jitter": "none"})
    assert merged.max_attempts == 2
    assert merged.jitter is Jitter.NONE
    assert merged.initial_delay_seconds == 2.0
    assert merged.non_retryable == (CardDeclined,)
    assert dict(merged.per_kind) == {FailureKind.TIMEOUT: {"max_attempts": 9}}
    assert base.max_attempts == 5  # the base is untouched
    assert base.jitter is Jitter.EQUAL


def test_merged_with_nothing_is_an_equal_policy():
    base = RetryPolicy(max_attempts=7, per_kind={"dependency": {"jitter": "none"}})
    assert base.merged({}) == base


def test_merged_replaces_per_kind_wholesale():
    base = RetryPolicy(per_kind={"timeout": {"max_attempts": 9}})
    merged = base.merged({"per_kind": {"dependency": {"max_attempts": 2}}})
    assert dict(merged.per_kind) == {FailureKind.DEPENDENCY: {"max_attempts": 2}}


def test_merged_validates_the_override():
    with pytest.raises(ValueError, match="max_attempts must be an integer >= 1"):
        RetryPolicy().merged({"max_attempts": 0})
    with pytest.raises(ValueError, match="unknown RetryPolicy fields"):
        RetryPolicy().merged({"attempts": 2})


# -- decide: when to park -------------------------------------------------------------------------


def test_a_permanent_failure_parks_at_once():
    verdict = RetryPolicy(max_attempts=10).decide(PERMANENT, [], uniform=highest)
    assert verdict.action is Action.PARK
    assert verdict.retrying is False
    assert verdict.delay_seconds is None
    assert verdict.reason == "permanent failure (validation error)"


def test_a_permanent_failure_without_a_reason_names_its_kind():
    failure = Failure(FailureKind.DEPENDENCY, permanent=True)
    assert RetryPolicy().decide(failure, []).reason == "permanent failure (dependency)"


def test_a_non_retryable_exception_parks_at_once_even_when_transient():
    policy = RetryPolicy(max_attempts=10, non_retryable=[CardDeclined])
    verdict = policy.decide(TRANSIENT, [], exception=CardDeclined("no funds"), uniform=highest)
    assert verdict == Verdict.park("CardDeclined is non-retryable for this task")


def test_subclasses_of_a_non_retryable_exception_park_too():
    policy = RetryPolicy(non_retryable=[f"{__name__}.CardDeclined"])
    assert policy.decide(TRANSIENT, [], exception=SoftDecline()).action is Action.PARK


def test_other_exceptions_are_not_non_retryable():
    policy = RetryPolicy(non_retryable=[CardDeclined])
    assert policy.decide(TRANSIENT, [], exception=ValueError("x")).action is Action.RETRY
    assert policy.decide(TRANSIENT, []).action is Action.RETRY


def test_max_attempts_four_retries_three_times_then_parks():
    policy = RetryPolicy(max_attempts=4, jitter="none")
    actions = [policy.decide(TRANSIENT, history(n)).action for n in range(4)]
    assert actions == [Action.RETRY, Action.RETRY, Action.RETRY, Action.PARK]
    assert policy.decide(TRANSIENT, history(3)).reason == "gave up after 4 attempts"


def test_max_attempts_one_never_retries():
    assert RetryPolicy(max_attempts=1).decide(TRANSIENT, []).action is Action.PARK


@settings(max_examples=200, deadline=None)
@given(max_attempts=st.integers(min_value=1, max_value=30),
       done=st.integers(min_value=0, max_value=40))
def test_a_transient_failure_retries_exactly_while_attempts_remain(max_attempts, done):
    verdict = RetryPolicy(max_attempts=max_attempts).decide(TRANSIENT, history(done))
    assert verdict.retrying is (done + 1 < max_attempts)


def test_the_retry_reason_counts_attempts():
    verdict = RetryPolicy(max_attempts=4).decide(TRANSIENT, history(1), uniform=highest)
    assert verdict.reason == "attempt 2 of 4 failed"


# -- decide: how long to wait ---------------------------------------------------------------------


def test_delays_follow_the_exponential_without_jitter():
    policy = RetryPolicy(max_attempts=10, initial_delay_seconds=1, multiplier=3,
                         max_delay_seconds=50, jitter="none")
    delays = [policy.decide(TRANSIENT, history(n)).delay_seconds for n in range(6)]
    assert delays == [1.0, 3.0, 9.0, 27.0, 50.0, 50.0]
    assert all(isinstance(d, float) for d in delays)


def test_decorrelated_delays_grow_from_the_last_recorded_delay():
    policy = RetryPolicy(max_attempts=10, initial_delay_seconds=1, max_delay_seconds=1_000,
                         jitter="decorrelated")
    past = [Attempt(2.0), Attempt(7.0), Attempt(None)]
    assert policy.decide(TRANSIENT, past, uniform=highest).delay_seconds == 21.0
    assert policy.decide(TRANSIENT, [], uniform=highest).delay_seconds == 3.0


@st.composite
def decisions(draw):
    initial = draw(delays)
    policy = RetryPolicy(
        max_attempts=draw(st.integers(min_value=2, max_value=40)),
        initial_delay_seconds=initial,
        multiplier=draw(multipliers),
        max_delay_seconds=initial + draw(caps_above),
        jitter=draw(st.sampled_from(ALL_JITTERS)),
    )
    done = draw(st.integers(min_value=0, max_value=policy.max_attempts - 2))
    past = [Attempt(draw(st.none() | delays)) for _ in range(done)]
    return policy, past


@settings(max_examples=200, deadline=None)
@given(case=decisions(), fraction=st.floats(min_value=0.0, max_value=1.0))
def test_every_retry_delay_lies_in_the_policy_envelope(case, fraction):
    policy, past = case
    verdict = policy.decide(TRANSIENT, past, uniform=fixed_uniform(fraction))
    assert verdict.action is Action.RETRY
    delay = verdict.delay_seconds
    retry = len(past) + 1
    cap = policy.max_delay_seconds
    exp = min(cap, policy.initial_delay_seconds * policy.multiplier ** (retry - 1))
    assert 0.0 <= delay <= cap
    if policy.jitter is Jitter.NONE:
        assert delay == exp
    elif policy.jitter is Jitter.FULL:
        assert 0.0 <= delay <= exp
    elif policy.jitter is Jitter.EQUAL:
        assert exp / 2 <= delay <= exp
    else:
        previous = next((a.delay_seconds for a in reversed(past) if a.delay_seconds), None)
        base = policy.initial_delay_seconds if previous is None else max(
            policy.initial_delay_seconds, previous)
        assert policy.initial_delay_seconds <= delay <= min(cap, 3 * base)


@settings(max_examples=100, deadline=None)
@given(case=decisions(), rnd=st.randoms(use_true_random=False))
def test_real_randomness_stays_within_the_cap(case, rnd):
    policy, past = case
    verdict = policy.decide(TRANSIENT, past, uniform=rnd.uniform)
    assert 0.0 <= verdict.delay_seconds <= policy.max_delay_seconds


def test_a_longer_retry_after_wins_over_the_backoff_and_the_cap():
    policy = RetryPolicy(max_attempts=5, initial_delay_seconds=1, max_delay_seconds=10,
                         jitter="none")
    asked = Failure(FailureKind.RESOURCE_EXHAUSTED, False, 3600.0, "HTTP 429")
    verdict = policy.decide(asked, [])
    assert verdict == Verdict.retry(3600.0, "attempt 1 of 5 failed; honouring Retry-After")
    assert verdict.delay_seconds > policy.max_delay_seconds


def test_a_shorter_retry_after_does_not_shorten_the_backoff():
    policy = RetryPolicy(max_attempts=5, initial_delay_seconds=8, max_delay_seconds=100,
                         jitter="none")
    asked = Failure(FailureKind.RESOURCE_EXHAUSTED, False, 2.0, "HTTP 429")
    verdict = policy.decide(asked, [])
    assert verdict.delay_seconds == 8.0
    assert "Retry-After" not in verdict.reason


def test_retry_after_does_not_rescue_an_exhausted_policy():
    asked = Failure(FailureKind.RESOURCE_EXHAUSTED, False, 5.0, "HTTP 429")
    assert RetryPolicy(max_attempts=2).decide(asked, history(1)).action is Action.PARK


@settings(max_examples=100, deadline=None)
@given(case=decisions(),
       retry_after=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
       fraction=st.floats(min_value=0.0, max_value=1.0))
def test_the_delay_is_never_shorter_than_retry_after(case, retry_after, fraction):
    policy, past = case
    failure = Failure(FailureKind.RESOURCE_EXHAUSTED, False, retry_after, "HTTP 429")
    verdict = policy.decide(failure, past, uniform=fixed_uniform(fraction))
    assert verdict.delay_seconds >= retry_after


def test_max_elapsed_parks_when_the_next_delay_would_pass_it():
    policy = RetryPolicy(max_attempts=100, initial_delay_seconds=10, max_delay_seconds=10,
                         jitter="none", max_elapsed_seconds=100)
    assert policy.decide(TRANSIENT, history(3), elapsed_seconds=85).delay_seconds == 10.0
    assert policy.decide(TRANSIENT, history(3), elapsed_seconds=90).action is Action.RETRY
    verdict = policy.decide(TRANSIENT, history(3), elapsed_seconds=95)
    assert verdict == Verdict.park("gave up: next attempt would pass max_elapsed_seconds=100")


def test_a_retry_after_beyond_max_elapsed_parks():
    policy = RetryPolicy(max_attempts=100, max_elapsed_seconds=600)
    asked = Failure(FailureKind.RESOURCE_EXHAUSTED, False, 3600.0, "HTTP 429")
    assert policy.decide(asked, [], elapsed_seconds=0).action is Action.PARK


@settings(max_examples=100, deadline=None)
@given(case=decisions(), limit=st.floats(min_value=0.001, max_value=1_000.0),
       elapsed=st.floats(min_value=0.0, max_value=2_000.0),
       fraction=st.floats(min_value=0.0, max_value=1.0))
def test_a_retry_is_never_scheduled_past_max_elapsed(case, limit, elapsed, fraction):
    policy, past = case
    policy = dataclasses.replace(policy, max_elapsed_seconds=limit)
    verdict = policy.decide(TRANSIENT, past, elapsed_seconds=elapsed,
                            uniform=fixed_uniform(fraction))
    if verdict.retrying:
        assert elapsed + verdict.delay_seconds <= limit


# -- decide: per-kind overrides -------------------------------------------------------------------


def test_per_kind_max_attempts_apply_to_their_kind_only():
    policy = RetryPolicy(max_attempts=3, per_kind={"resource_exhausted": {"max_attempts": 10}})
    assert [policy.decide(EXHAUSTED, history(n)).action for n in range(10)] == \
        [Action.RETRY] * 9 + [Action.PARK]
    assert [policy.decide(DEPENDENCY, history(n)).action for n in range(3)] == \
        [Action.RETRY, Action.RETRY, Action.PARK]


def test_per_kind_delays_apply_to_their_kind_only():
    policy = RetryPolicy(
        max_attempts=5, initial_delay_seconds=1, jitter="none",
        per_kind={"resource_exhausted": {"initial_delay_seconds": 60, "max_delay_seconds": 3600}},
    )
    assert policy.decide(EXHAUSTED, history(2)).delay_seconds == 240.0
    assert policy.decide(DEPENDENCY, history(2)).delay_seconds == 4.0


def test_per_kind_max_elapsed_applies_to_its_kind_only():
    policy = RetryPolicy(max_attempts=10, jitter="none",
                         per_kind={"dependency": {"max_elapsed_seconds": 5}})
    assert policy.decide(DEPENDENCY, [], elapsed_seconds=10).action is Action.PARK
    assert policy.decide(EXHAUSTED, [], elapsed_seconds=10).action is Action.RETRY


def test_per_kind_overrides_do_not_rescue_permanent_or_non_retryable_failures():
    policy = RetryPolicy(non_retryable=[CardDeclined],
                         per_kind={"dependency": {"max_attempts": 50},
                                   "data_integrity": {"max_attempts": 50}})
    assert policy.decide(PERMANENT, []).action is Action.PARK
    assert policy.decide(DEPENDENCY, [], exception=CardDeclined()).action is Action.PARK


def test_for_kind_without_overrides_is_the_policy_itself():
    policy = RetryPolicy(per_kind={"timeout": {"max_attempts": 9}})
    assert policy.for_kind(FailureKind.DEPENDENCY) is policy
    specialised = policy.for_kind(FailureKind.TIMEOUT)
    assert specialised.max_attempts == 9
    assert dict(specialised.per_kind) == {}


# -- Verdict --------------------------------------------------------------------------------------


def test_verdict_retry_constructor():
    verdict = Verdict.retry(5, "attempt 1 of 3 failed")
    assert verdict.action is Action.RETRY
    assert verdict.delay_seconds == 5.0
    assert isinstance(verdict.delay_seconds, float)
    assert verdict.reason == "attempt 1 of 3 failed"
    assert verdict.retrying is True


def test_verdict_park_constructor():
    verdict = Verdict.park("gave up after 3 attempts")
    assert verdict.action is Action.PARK
    assert verdict.delay_seconds is None
    assert verdict.reason == "gave up after 3 attempts"
    assert verdict.retrying is False


def test_a_verdict_is_a_frozen_value():
    verdict = Verdict.retry(1.0, "r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.delay_seconds = 2.0  # type: ignore[misc]
    assert verdict == Verdict.retry(1, "r")
    assert verdict != Verdict.retry(2, "r")
    assert verdict != Verdict.park("r")
    assert len({verdict, Verdict.retry(1.0, "r"), Verdict.park("r")}) == 2
