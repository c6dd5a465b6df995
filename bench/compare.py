"""Two runs of bench/run.py side by side: each figure old -> new and how much it moved.

Use it before and after a change, both runs on the same machine and mode: a move smaller than
either run's spread is noise, and the spread is printed next to each value to judge that.

Usage: python bench/compare.py old.json new.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import number, table  # noqa: E402
from bench.rounds import Figure  # noqa: E402

HEADER = ("figure", "old", "new", "change", "verdict")


def load(path: Path) -> dict[str, Any]:
    """A results.json as written by bench/run.py."""
    return json.loads(Path(path).read_text())


def shown(figure: Figure | None) -> str:
    """A value with its spread, or "—" when the run has no such figure."""
    if figure is None:
        return "—"
    spread = (f" ({number(figure.spread[0], figure.unit)}–{number(figure.spread[1], figure.unit)})"
              if figure.spread else "")
    return number(figure.value, figure.unit) + spread


def change(old: Figure | None, new: Figure | None) -> str:
    """The relative change of the value, "new" or "gone" when one side lacks the figure."""
    if old is None:
        return "new"
    if new is None:
        return "gone"
    if old.value == 0 or math.isnan(old.value) or math.isnan(new.value):
        return "—"
    return f"{(new.value - old.value) / abs(old.value) * 100:+.1f}%"


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """One row per figure of either run, in the new run's order, then those that went."""
    before = {f["name"]: Figure.from_json(f) for f in old.get("figures", [])}
    after = {f["name"]: Figure.from_json(f) for f in new.get("figures", [])}
    names = list(after) + [name for name in before if name not in after]
    rows = []
    for name in names:
        was, now = before.get(name), after.get(name)
        verdict = " -> ".join(f.verdict if f else "—" for f in (was, now))
        rows.append((name, shown(was), shown(now), change(was, now), verdict))
    return rows


def context(label: str, run: dict[str, Any]) -> str:
    """One line saying what a run was: mode, commit, when, and how busy the machine was."""
    machine = run.get("machine", {})
    load = machine.get("load_average_before", ["?"])[0]
    load = f"{load:.2f}" if isinstance(load, (int, float)) else load
    return (f"{label}: {run.get('mode', '?')} run of {machine.get('git_commit', '?')} at "
            f"{run.get('timestamp', '?')}, {machine.get('cpu_count', '?')} CPUs, load {load}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    options = parser.parse_args(argv)
    old, new = load(options.old), load(options.new)
    print(context("old", old))
    print(context("new", new))
    if old.get("mode") != new.get("mode"):
        print("warning: the runs are of different modes; their figures are not comparable")
    print(table(compare(old, new), header=HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
