"""Backoff maths, kept pure so it can be tested exhaustively without sleeping.

The jitter strategies are the ones compared in Marc Brooker's "Exponential
Backoff and Jitter" (AWS Architecture Blog, 2015): jitter spreads a crowd of
retrying clients so they stop hitting a recovering dependency in lockstep.
Randomness is injected (``uniform(a, b) -> float``) so tests are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import Enum

__all__ = ["Jitter", "exponential_delay", "backoff_delay", "Uniform"]

Uniform = Callable[[float, float], float]


class Jitter(str, Enum):
    """How a computed exponential delay is randomised."""

    NONE = "none"
    FULL = "full"
    EQUAL = "equal"
    DECORRELATED = "decorrelated"


def exponential_delay(retry_number: int, initial: float, multiplier: float, cap: float) -> float:
    """The un-jittered delay before retry ``retry_number`` (1-based), capped at ``cap``."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    # Guard the power against overflow for very long retry sequences.
    try:
        raw = initial * (multiplier ** (retry_number - 1))
    except OverflowError:
        raw = cap if initial > 0 else 0.0  # 0 * anything is still 0
    return min(cap, raw)


def backoff_delay(
    retry_number: int,
    *,
    initial: float,
    multiplier: float,
    cap: float,
    jitter: Jitter = Jitter.FULL,
    previous_delay: float | None = None,
    uniform: Uniform = random.uniform,
) -> float:
    """The delay in seconds before retry ``retry_number``; always within ``[0, cap]``.

    ``previous_delay`` feeds decorrelated jitter (``min(cap, U(initial, 3 * previous))``);
    the other strategies ignore it.
    """
    jitter = Jitter(jitter)
    if jitter is Jitter.DECORRELATED:
        previous = initial if previous_delay is None else max(initial, previous_delay)
        return min(cap, uniform(initial, previous * 3))
    delay = exponential_delay(retry_number, initial, multiplier, cap)
    if jitter is Jitter.NONE:
        return delay
    if jitter is Jitter.FULL:
        return uniform(0.0, delay)
    half = delay / 2
    return half + uniform(0.0, half)
