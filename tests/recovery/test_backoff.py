"""recovery.core.backoff: exponential delays, the four jitter strategies, and their bounds."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.core.backoff import Jitter, backoff_delay, exponential_delay

ALL_JITTERS = [j.value for j in Jitter]

retry_numbers = st.integers(min_value=1, max_value=5_000)
initials = st.floats(min_value=0.0, max_value=1_000.0, allow_nan=False, allow_infinity=False)
multipliers = st.one_of(
    st.floats(min_value=1.0, max_value=10.0, allow_nan=False, allow_infinity=False),
    st.integers(min_value=1, max_value=10),
)
extras = st.floats(min_value=0.0, max_value=100_000.0, allow_nan=False, allow_infinity=False)
previous_delays = st.none() | st.floats(
    min_value=0.0, max_value=100_000.0, allow_nan=False, allow_infinity=False
)
fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)


def fixed_uniform(fraction: float):
    """A well-behaved uniform(a, b): the point ``fraction`` of the way from a to b."""

    def uniform(a: float, b: float) -> float:
        return min(b, max(a, a + (b - a) * fraction))

    return uniform


def lowest(a, b):
    return a


def highest(a, b):
    return b


# -- the envelope shared by every strategy ----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    jitter=st.sampled_from(ALL_JITTERS),
    retry_number=retry_numbers,
    initial=initials,
    multiplier=multipliers,
    extra=extras,
    previous=previous_delays,
    rnd=st.randoms(use_true_random=False),
)
def test_every_jitter_keeps_the_delay_between_zero_and_the_cap(
    jitter, retry_number, initial, multiplier, extra, previous, rnd
):
    cap = initial + extra
    delay = backoff_delay(
        retry_number,
        initial=initial,
        multiplier=multiplier,
        cap=cap,
        jitter=jitter,
        previous_delay=previous,
        uniform=rnd.uniform,
    )
    assert isinstance(delay, float | int)
    assert 0.0 <= delay <= cap


@pytest.mark.parametrize("jitter", ALL_JITTERS)
def test_the_default_random_source_also_stays_within_the_cap(jitter):
    rng_state = random.getstate()
    try:
        random.seed(1234)
        for retry_number in range(1, 60):
            delay = backoff_delay(
                retry_number, initial=0.5, multiplier=2.0, cap=30.0, jitter=jitter,
                previous_delay=20.0,
            )
            assert 0.0 <= delay <= 30.0
    finally:
        random.setstate(rng_state)


# -- "none": the plain exponential ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    retry_number=st.integers(min_value=1, max_value=60),
    initial=initials,
    multiplier=multipliers,
    extra=extras,
)
def test_no_jitter_is_exactly_the_capped_exponential(retry_number, initial, multiplier, extra):
    cap = initial + extra
    expected = min(cap, initial * multiplier ** (retry_number - 1))
    assert backoff_delay(
        retry_number, initial=initial, multiplier=multiplier, cap=cap, jitter="none"
    ) == expected
    assert exponential_delay(retry_number, initial, multiplier, cap) == expected


def test_no_jitter_doubles_until_the_cap():
    delays = [
        backoff_delay(n, initial=1.0, multiplier=2.0, cap=10.0, jitter=Jitter.NONE)
        for n in range(1, 7)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_no_jitter_never_consults_the_random_source():
    def refuse(a, b):
        raise AssertionError("uniform must not be called without jitter")

    assert backoff_delay(3, initial=1.0, multiplier=3.0, cap=100.0, jitter="none",
                         uniform=refuse) == 9.0


def test_a_multiplier_of_one_gives_a_constant_delay():
    assert {backoff_delay(n, initial=2.5, multiplier=1.0, cap=60.0, jitter="none")
            for n in range(1, 50)} == {2.5}


# -- "full" and "equal" -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    retry_number=st.integers(min_value=1, max_value=200),
    initial=initials,
    multiplier=multipliers,
    extra=extras,
    fraction=fractions,
)
def test_full_jitter_lies_between_zero_and_the_exponential(
    retry_number, initial, multiplier, extra, fraction
):
    cap = initial + extra
    exp = exponential_delay(retry_number, initial, multiplier, cap)
    delay = backoff_delay(retry_number, initial=initial, multiplier=multiplier, cap=cap,
                          jitter="full", uniform=fixed_uniform(fraction))
    assert 0.0 <= delay <= exp


@settings(max_examples=200, deadline=None)
@given(
    retry_number=st.integers(min_value=1, max_value=200),
    initial=initials,
    multiplier=multipliers,
    extra=extras,
    fraction=fractions,
)
def test_equal_jitter_lies_between_half_the_exponential_and_the_exponential(
    retry_number, initial, multiplier, extra, fraction
):
    cap = initial + extra
    exp = exponential_delay(retry_number, initial, multiplier, cap)
    delay = backoff_delay(retry_number, initial=initial, multiplier=multiplier, cap=cap,
                          jitter="equal", uniform=fixed_uniform(fraction))
    assert exp / 2 <= delay <= exp


def test_full_jitter_draws_from_zero_to_the_exponential():
    calls = []

    def recording(a, b):
        calls.append((a, b))
        return a

    backoff_delay(4, initial=1.0, multiplier=2.0, cap=100.0, jitter="full", uniform=recording)
    assert calls == [(0.0, 8.0)]


def test_injected_uniform_makes_full_jitter_deterministic():
    kwargs = dict(initial=1.0, multiplier=2.0, cap=100.0, jitter=Jitter.FULL)
    assert backoff_delay(4, uniform=lowest, **kwargs) == 0.0
    assert backoff_delay(4, uniform=highest, **kwargs) == 8.0
    assert backoff_delay(20, uniform=highest, **kwargs) == 100.0


def test_injected_uniform_makes_equal_jitter_deterministic():
    kwargs = dict(initial=1.0, multiplier=2.0, cap=100.0, jitter=Jitter.EQUAL)
    assert backoff_delay(4, uniform=lowest, **kwargs) == 4.0
    assert backoff_delay(4, uniform=highest, **kwargs) == 8.0
    assert backoff_delay(20, uniform=lowest, **kwargs) == 50.0


# -- "decorrelated" ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    retry_number=retry_numbers,
    initial=initials,
    multiplier=multipliers,
    extra=extras,
    previous=previous_delays,
    fraction=fractions,
)
def test_decorrelated_jitter_lies_between_initial_and_three_times_the_previous_delay(
    retry_number, initial, multiplier, extra, previous, fraction
):
    cap = initial + extra
    delay = backoff_delay(retry_number, initial=initial, multiplier=multiplier, cap=cap,
                          jitter="decorrelated", previous_delay=previous,
                          uniform=fixed_uniform(fraction))
    base = initial if previous is None else max(initial, previous)
    assert initial <= delay <= min(cap, 3 * base)


def test_decorrelated_jitter_grows_from_the_previous_delay_not_the_retry_number():
    kwargs = dict(initial=1.0, multiplier=2.0, cap=1_000.0, jitter="decorrelated")
    assert backoff_delay(1, previous_delay=10.0, uniform=highest, **kwargs) == 30.0
    assert backoff_delay(50, previous_delay=10.0, uniform=highest, **kwargs) == 30.0
    assert backoff_delay(50, previous_delay=10.0, uniform=lowest, **kwargs) == 1.0


def test_decorrelated_jitter_without_a_previous_delay_starts_from_initial():
    kwargs = dict(initial=2.0, multiplier=2.0, cap=1_000.0, jitter="decorrelated")
    assert backoff_delay(1, uniform=highest, **kwargs) == 6.0
    assert backoff_delay(1, uniform=lowest, **kwargs) == 2.0


def test_decorrelated_jitter_treats_a_previous_delay_below_initial_as_initial():
    assert backoff_delay(3, initial=5.0, multiplier=2.0, cap=1_000.0, jitter="decorrelated",
                         previous_delay=0.1, uniform=highest) == 15.0


def test_decorrelated_jitter_is_capped():
    assert backoff_delay(3, initial=1.0, multiplier=2.0, cap=20.0, jitter="decorrelated",
                         previous_delay=500.0, uniform=highest) == 20.0


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_number", [0, -1, -1_000])
def test_retry_numbers_below_one_are_rejected(retry_number):
    with pytest.raises(ValueError, match="retry_number starts at 1"):
        exponential_delay(retry_number, 1.0, 2.0, 10.0)
    with pytest.raises(ValueError, match="retry_number starts at 1"):
        backoff_delay(retry_number, initial=1.0, multiplier=2.0, cap=10.0, jitter="full")


def test_an_unknown_jitter_is_rejected():
    with pytest.raises(ValueError):
        backoff_delay(1, initial=1.0, multiplier=2.0, cap=10.0, jitter="gaussian")


@pytest.mark.parametrize("jitter", ALL_JITTERS)
def test_jitter_may_be_given_as_enum_or_string(jitter):
    kwargs = dict(initial=1.0, multiplier=2.0, cap=100.0, previous_delay=4.0, uniform=highest)
    assert backoff_delay(3, jitter=jitter, **kwargs) == backoff_delay(3, jitter=Jitter(jitter),
                                                                      **kwargs)


# -- very long retry sequences ----------------------------------------------------------------


@pytest.mark.parametrize("retry_number", [1_100, 10**6, 10**18])
@pytest.mark.parametrize("jitter", ALL_JITTERS)
def test_huge_retry_numbers_do_not_overflow(retry_number, jitter):
    delay = backoff_delay(retry_number, initial=1.0, multiplier=2.0, cap=300.0, jitter=jitter,
                          previous_delay=250.0, uniform=highest)
    assert delay == 300.0


@settings(max_examples=100, deadline=None)
@given(
    retry_number=st.integers(min_value=1, max_value=10**30),
    initial=initials,
    multiplier=st.floats(min_value=1.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    extra=extras,
)
def test_the_exponential_is_finite_and_capped_for_any_retry_number(
    retry_number, initial, multiplier, extra
):
    cap = initial + extra
    delay = exponential_delay(retry_number, initial, multiplier, cap)
    assert math.isfinite(delay)
    assert 0.0 <= delay <= cap


@pytest.mark.parametrize("retry_number", [1, 1_100, 10**6, 10**18])
def test_a_zero_initial_delay_stays_zero_however_long_the_sequence(retry_number):
    # 0 * multiplier**n is 0 for every n: the overflow guard must not turn it into the cap.
    assert exponential_delay(retry_number, 0.0, 2.0, 300.0) == 0.0
    assert backoff_delay(retry_number, initial=0.0, multiplier=2.0, cap=300.0, jitter="none") == 0.0
