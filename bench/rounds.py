"""Interleaved rounds and the figures they produce: the part of the harness that must be right.

A shared 2-core machine drifts by ±20% from one minute to the next, so two sides measured one
after the other compare the machine's moods, not the code. Each round therefore runs every side
back to back (A, B), the next round swaps who goes first (B, A), and the figure is the median of
the per-round ratios, with their min–max as the spread: a ratio whose spread straddles the
target says "not decided", whatever its median.

Pure: no Django, no broker, no clock; the callables do the measuring.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")

#: Comparison operators a target may use, and what they mean.
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, target: value >= target,
    "<": lambda value, target: value < target,
    "<=": lambda value, target: value <= target,
}


def interleave(sides: Sequence[Callable[[], T]], rounds: int) -> list[tuple[T, ...]]:
    """Run every side once per round, the order reversed on every other round.

    Use it for any A/B measurement: round 1 runs A, B; round 2 runs B, A; and so on, so that
    neither side always profits from a warm cache or suffers a slow start.

    Returns:
        One tuple per round with the sides' values in the order of ``sides`` (not the order
        they ran in).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    results: list[tuple[T, ...]] = []
    for number in range(rounds):
        order = range(len(sides)) if number % 2 == 0 else reversed(range(len(sides)))
        values: dict[int, T] = {}
        for index in order:
            values[index] = sides[index]()
        results.append(tuple(values[index] for index in range(len(sides))))
    return results


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and their range."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]


def summarise(values: Sequence[float]) -> Spread:
    """Median and min–max of per-round values (ratios, usually)."""
    if not values:
        raise ValueError("no rounds to summarise")
    return Spread(statistics.median(values), min(values), max(values), tuple(values))


def ratio_spread(rounds: Sequence[tuple[T, ...]], ratio: Callable[..., float]) -> Spread:
    """Per-round ratios, then their median and range: never a ratio of two medians.

    ``ratio`` receives one round's values (as :func:`interleave` returns them) and gives
    that round's ratio.
    """
    return summarise([ratio(*values) for values in rounds])


@dataclass(frozen=True)
class Figure:
    """One benchmark result with its target: one row of the table and of results.json.

    Attributes:
        name: what was measured, unique within a run ("success wall clock (recovery/plain)").
        value: the figure itself: a median of per-round ratios, or a percentile.
        unit: "x" for a ratio, "ms", "MiB"...
        target_op: ">=", "<" or "<=": how ``value`` must compare with ``target``.
        target: the issue's target.
        spread: min–max of the per-round values, or None when there are no rounds.
        detail: the raw figures behind a ratio, for a human (rates, CPU per task, N).
    """

    name: str
    value: float
    unit: str
    target_op: str
    target: float
    spread: tuple[float, float] | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.target_op not in OPERATORS:
            raise ValueError(f"target_op must be one of {sorted(OPERATORS)}, not {self.target_op!r}")

    @property
    def verdict(self) -> str:
        """PASS when the value meets the target, MISS otherwise (a NaN value misses)."""
        return "PASS" if OPERATORS[self.target_op](self.value, self.target) else "MISS"

    def to_json(self) -> dict[str, Any]:
        """A plain dict for results.json, the verdict included for readers of the file."""
        data = asdict(self)
        data["spread"] = list(self.spread) if self.spread is not None else None
        data["verdict"] = self.verdict
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Figure":
        """The inverse of :meth:`to_json` (the stored verdict is recomputed, not trusted)."""
        spread = data.get("spread")
        return cls(name=data["name"], value=float(data["value"]), unit=data.get("unit", ""),
                   target_op=data["target_op"], target=float(data["target"]),
                   spread=(float(spread[0]), float(spread[1])) if spread else None,
                   detail=data.get("detail", ""))


def ratio_figure(name: str, spread: Spread, target_op: str, target: float, detail: str = "") -> Figure:
    """A ratio figure from a :class:`Spread`: the shape most benchmarks report."""
    return Figure(name=name, value=spread.median, unit="x", target_op=target_op, target=target,
                  spread=(spread.low, spread.high), detail=detail)
