"""Every benchmark in one invocation: one table of figures against their targets, and
bench/results.json for ``bench/compare.py``.

Each module runs in a child process of its own: the modules point Django at different
databases when imported, and a crash in one must neither hide the others' figures nor pass
for a result. A module is imported by name (``bench.<name>``) and asked for
``figures(mode) -> list[Figure]``; a module that does not exist yet, or has no ``figures``,
is a "not available" row, never a silent gap. A crash is a "CRASH" row and makes the run
exit 2 in every mode; a missed target makes a full run exit 1, while --quick and --smoke
exit 0 whatever the figures (CI runs them to catch crashes, not to judge a shared VM).

Usage: python bench/run.py [--quick | --smoke] [--only NAME ...] [--json PATH]
                           [--throughput-broker URL]
Environment: BENCH_DATABASE_URL, BENCH_BROKER_URL (read by each module), as in bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.plan import MODES, PLAN  # noqa: E402
from bench.report import row, status_row, table  # noqa: E402
from bench.rounds import Figure  # noqa: E402

#: The modules in the order they run and print.
MODULES = ("throughput", "bulk_replay", "changelist", "metrics_scrape", "escalation_storm")
RESULTS = ROOT / "bench" / "results.json"
OK, NOT_AVAILABLE, CRASH = "ok", "not available", "CRASH"
#: How long one module may run before it counts as crashed: a hung benchmark must not hang CI.
#: (Only the module's process is killed: a worker it started may outlive it.)
TIMEOUT_SECONDS = {"full": 4 * 3600, "quick": 600, "smoke": 120}


@dataclass
class Outcome:
    """What one module gave: its figures, or why it gave none."""

    name: str
    status: str
    figures: list[Figure] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                "seconds": round(self.seconds, 1), "figures": [f.to_json() for f in self.figures]}


def as_figure(value: Any) -> Figure:
    """A module's figure as this harness's :class:`Figure`: one imported under another module
    name (``rounds.Figure`` with bench/ on sys.path) is a different class with the same
    fields, and is taken field by field (which also validates target_op)."""
    if isinstance(value, Figure):
        return value
    try:
        return Figure(**{name: getattr(value, name) for name in Figure.__dataclass_fields__})
    except AttributeError as missing:
        raise TypeError(f"figures() must return bench.rounds.Figure objects, not {value!r}") from missing


def child(name: str, mode: str, out: Path) -> None:
    """In the child process: import the module, call figures(mode), write them to ``out``."""
    module = importlib.import_module(f"bench.{name}")
    produce = getattr(module, "figures", None)
    if not callable(produce):
        result = {"status": NOT_AVAILABLE, "reason": f"bench/{name}.py has no figures(mode)"}
    else:
        result = {"status": OK, "figures": [as_figure(f).to_json() for f in produce(mode)]}
    out.write_text(json.dumps(result))


def run_module(name: str, mode: str, env: dict[str, str]) -> Outcome:
    """Run one module in a child process; its output streams through, its figures come back
    in a file."""
    if importlib.util.find_spec(f"bench.{name}") is None:
        return Outcome(name, NOT_AVAILABLE, reason=f"bench/{name}.py does not exist")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures.json"
        child_process = subprocess.Popen(
            [sys.executable, __file__, "--child", name, "--mode", mode, "--out", str(out)],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = child_process.communicate(timeout=TIMEOUT_SECONDS[mode])
        except subprocess.TimeoutExpired:
            child_process.kill()  # same process group as this one, so Ctrl-C still reaches it
            _, stderr = child_process.communicate()
            stderr += f"\nTimeoutError: no figures after {TIMEOUT_SECONDS[mode]} s ({mode} run)\n"
        seconds = time.monotonic() - started
        if stderr:
            sys.stderr.write(stderr)
        if child_process.returncode != 0 or not out.exists():
            return Outcome(name, CRASH, reason=crash_reason(child_process.returncode, stderr),
                           seconds=seconds)
        result = json.loads(out.read_text())
    return Outcome(name, result["status"], [Figure.from_json(f) for f in result.get("figures", [])],
                   result.get("reason", ""), seconds)


def crash_reason(returncode: int, stderr: str) -> str:
    """The line of a crashed child's stderr that says what went wrong: the last one that is
    not indented (a traceback's exception line, or a SystemExit message's first line)."""
    lines = [line for line in (stderr or "").splitlines() if line.strip() and not line[0].isspace()]
    return f"exit status {returncode}" + (f": {lines[-1][:200]}" if lines else "")


def git_commit() -> str:
    """The commit measured, with "+dirty" when the tree has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def render(outcomes: list[Outcome]) -> str:
    """The one table: every figure, and a row for every module that gave none."""
    rows, details = [], []
    for outcome in outcomes:
        if outcome.status == OK:
            rows += [row(f) for f in outcome.figures]
            details += [f"  {f.name}: {f.detail}" for f in outcome.figures if f.detail]
        else:
            rows.append(status_row(outcome.name, outcome.status))
            details.append(f"  {outcome.name}: {outcome.status}: {outcome.reason}")
    return table(rows, details)


def exit_status(outcomes: list[Outcome], mode: str) -> int:
    """2 if a module crashed (any mode); 1 if a full run missed a target; else 0."""
    if any(o.status == CRASH for o in outcomes):
        return 2
    missed = any(f.verdict == "MISS" for o in outcomes for f in o.figures)
    return 1 if missed and mode == "full" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes, exit 0 on MISS")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: proves the harness runs")
    parser.add_argument("--only", choices=MODULES, action="append", help="run this module (repeatable)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--throughput-broker", metavar="URL",
                        help="the broker of throughput.py alone (default: BENCH_BROKER_URL)")
    parser.add_argument("--child", choices=MODULES, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        child(options.child, options.mode, options.out)
        return 0
    mode = "quick" if options.quick else "smoke" if options.smoke else "full"

    load_before = os.getloadavg()
    started = datetime.now(timezone.utc)
    outcomes = []
    for name in options.only or MODULES:
        env = dict(os.environ)
        if name == "throughput" and options.throughput_broker:
            env["BENCH_BROKER_URL"] = options.throughput_broker
        print(f"== {name} ({mode}{': ' + str(PLAN[name][mode]) if name in PLAN else ''})", flush=True)
        outcomes.append(run_module(name, mode, env))
    print(render(outcomes))

    results = {
        "mode": mode,
        "timestamp": started.isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg()), "git_commit": git_commit(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "plan": {name: PLAN[name][mode] for name in options.only or MODULES if name in PLAN},
        "modules": [o.to_json() for o in outcomes],
        "figures": [f.to_json() for o in outcomes for f in o.figures],
    }
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    status = exit_status(outcomes, mode)
    print(f"results: {options.json}; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
