"""The benchmark harness: interleaved rounds, figures and verdicts, the table, the comparison
of two runs, and one real run of bench/run.py --smoke.

The figures of a benchmark are only as good as the harness that takes them: these tests pin
the order of the sides, that a figure is a median of per-round ratios (not a ratio of
medians), and that a module that is missing or crashes shows as a row, never as a gap.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare, report, rounds, run
from bench.proc_cpu import TICKS, parse_stat, tree_cpu_seconds
from bench.rounds import Figure

ROOT = Path(__file__).resolve().parents[2]


def figure(name: str = "ratio", value: float = 1.0, **changes: object) -> Figure:
    fields: dict = {"name": name, "value": value, "unit": "x", "target_op": ">=", "target": 0.97,
                    "spread": (0.9, 1.1), "detail": ""}
    fields.update(changes)
    return Figure(**fields)


# -- rounds -------------------------------------------------------------------------------

def test_interleave_swaps_who_goes_first_every_round() -> None:
    ran: list[str] = []

    def side(label: str):
        def measure() -> str:
            ran.append(label)
            return label
        return measure

    results = rounds.interleave([side("A"), side("B")], 5)

    assert ran == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]
    assert results == [("A", "B")] * 5  # values always in the order of the sides


def test_interleave_refuses_zero_rounds() -> None:
    with pytest.raises(ValueError):
        rounds.interleave([lambda: 1], 0)


def test_ratio_spread_is_the_median_of_per_round_ratios_not_a_ratio_of_medians() -> None:
    # Given rounds where the machine slowed both sides down together in round 2
    measured = [(100.0, 90.0), (50.0, 50.0), (200.0, 210.0)]

    spread = rounds.ratio_spread(measured, lambda a, b: b / a)

    assert spread.median == pytest.approx(1.0)
    assert (spread.low, spread.high) == (pytest.approx(0.9), pytest.approx(1.05))
    # the ratio of the medians would have said 90/100 = 0.9
    assert len(spread.values) == 3


def test_summarise_refuses_no_rounds() -> None:
    with pytest.raises(ValueError):
        rounds.summarise([])


@pytest.mark.parametrize(("op", "value", "target", "verdict"), [
    (">=", 0.97, 0.97, "PASS"), (">=", 0.969, 0.97, "MISS"),
    ("<", 149.9, 150.0, "PASS"), ("<", 150.0, 150.0, "MISS"),
    ("<=", 1.1, 1.1, "PASS"), ("<=", 1.11, 1.1, "MISS"),
    (">=", math.nan, 1.0, "MISS"),
])
def test_verdict_compares_the_value_with_the_target(op: str, value: float, target: float,
                                                    verdict: str) -> None:
    assert figure(value=value, target_op=op, target=target).verdict == verdict


def test_figure_refuses_an_unknown_operator() -> None:
    with pytest.raises(ValueError, match="target_op"):
        figure(target_op="=>")


def test_figure_is_frozen_and_round_trips_through_json() -> None:
    original = figure(detail="N=10")
    with pytest.raises(AttributeError):
        original.value = 2.0  # type: ignore[misc]

    data = json.loads(json.dumps(original.to_json()))

    assert data["verdict"] == "PASS"
    assert Figure.from_json(data) == original


# -- /proc ----------------------------------------------------------------------------------

def test_parse_stat_counts_fields_after_a_command_name_with_spaces_and_parentheses() -> None:
    line = ("4242 (celery (worker) x) S 4000 4242 4242 0 -1 4194560 1 2 3 4 "
            "110 22 33 44 20 0 3 0 100 0 0")
    stat = parse_stat(line)
    assert (stat.pid, stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (
        4242, 4000, 110, 22, 33, 44)
    assert stat.ticks == 209


def test_tree_cpu_counts_the_worker_its_reaped_children_and_its_live_children(tmp_path: Path) -> None:
    def stat(pid: int, ppid: int, utime: int, stime: int, cutime: int, cstime: int) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} (python) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 1 0")

    stat(100, 1, 10, 5, 7, 3)     # the worker, with reaped children's 7 + 3
    stat(101, 100, 20, 2, 0, 0)   # a live pool child
    stat(102, 100, 30, 1, 0, 0)   # another
    stat(200, 1, 999, 999, 0, 0)  # a stranger
    (tmp_path / "self").mkdir()   # not a pid

    assert tree_cpu_seconds(100, tmp_path) == pytest.approx(78 / TICKS)
    with pytest.raises(ProcessLookupError):
        tree_cpu_seconds(300, tmp_path)


# -- report ---------------------------------------------------------------------------------

def test_table_has_a_row_per_figure_with_spread_target_and_verdict() -> None:
    text = report.figures_table([figure("success wall", 0.95, detail="plain 100 t/s"),
                                 figure("p95", 120.0, unit="ms", target_op="<", target=150.0,
                                        spread=None)])
    lines = text.splitlines()

    assert lines[0].split(" | ")[0].strip() == "figure"
    assert "0.950x" in lines[2] and "0.900x–1.100x" in lines[2] and ">= 0.970x" in lines[2]
    assert lines[2].rstrip().endswith("MISS")
    assert "120.0 ms" in lines[3] and "< 150.0 ms" in lines[3] and lines[3].rstrip().endswith("PASS")
    assert lines[4] == "  success wall: plain 100 t/s"


def test_run_renders_missing_and_crashed_modules_as_rows() -> None:
    outcomes = [run.Outcome("throughput", run.OK, [figure("success wall")]),
                run.Outcome("metrics_scrape", run.NOT_AVAILABLE, reason="bench/metrics_scrape.py does not exist"),
                run.Outcome("bulk_replay", run.CRASH, reason="exit status 1: RuntimeError: boom")]

    text = run.render(outcomes)

    assert any(l.startswith("metrics_scrape") and l.rstrip().endswith("not available") for l in text.splitlines())
    assert any(l.startswith("bulk_replay") and l.rstrip().endswith("CRASH") for l in text.splitlines())
    assert "RuntimeError: boom" in text


def test_exit_status_fails_on_a_crash_always_and_on_a_miss_only_in_a_full_run() -> None:
    missed = [run.Outcome("throughput", run.OK, [figure(value=0.5)])]
    crashed = [run.Outcome("bulk_replay", run.CRASH, reason="x")]
    absent = [run.Outcome("changelist", run.NOT_AVAILABLE, reason="x")]

    assert [run.exit_status(missed, mode) for mode in ("full", "quick", "smoke")] == [1, 0, 0]
    assert [run.exit_status(crashed, mode) for mode in ("full", "quick", "smoke")] == [2, 2, 2]
    assert run.exit_status(absent, "full") == 0


def test_crash_reason_is_the_exception_line_of_a_traceback() -> None:
    stderr = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
              "    boom()\nRuntimeError: the worker never finished\n")
    assert run.crash_reason(1, stderr) == "exit status 1: RuntimeError: the worker never finished"
    assert run.crash_reason(-9, "") == "exit status -9"


def test_a_module_that_does_not_exist_is_not_available() -> None:
    outcome = run.run_module("no_such_benchmark", "smoke", dict(os.environ))
    assert (outcome.status, outcome.reason) == (run.NOT_AVAILABLE, "bench/no_such_benchmark.py does not exist")


# -- compare --------------------------------------------------------------------------------

def test_a_figure_of_another_figure_class_is_taken_field_by_field() -> None:
    class Lookalike:
        name, value, unit, target_op, target, spread, detail = "p95", 90.0, "ms", "<", 150.0, None, ""

    assert run.as_figure(Lookalike()) == Figure("p95", 90.0, "ms", "<", 150.0)
    with pytest.raises(TypeError):
        run.as_figure(object())


def test_compare_prints_old_to_new_with_the_change_and_new_and_gone_figures() -> None:
    old = {"figures": [figure("a", 1.0).to_json(), figure("gone", 2.0).to_json()]}
    new = {"figures": [figure("a", 0.9).to_json(), figure("fresh", 3.0).to_json()]}

    rows = {r[0]: r for r in compare.compare(old, new)}

    assert rows["a"][1:] == ("1.000x (0.900x–1.100x)", "0.900x (0.900x–1.100x)", "-10.0%", "PASS -> MISS")
    assert rows["fresh"][3] == "new" and rows["gone"][3] == "gone"


def test_compare_main_reads_two_results_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, value in (("old.json", 1.0), ("new.json", 1.2)):
        (tmp_path / name).write_text(json.dumps({"mode": "quick", "figures": [figure("a", value).to_json()]}))

    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0

    assert "+20.0%" in capsys.readouterr().out


# -- one real run ---------------------------------------------------------------------------

def bench_env() -> dict[str, str]:
    """The bench's own database and Redis db, next to the suite's: BENCH_* when set, else the
    test database's name with "_bench" appended and Redis db 13 (the bench flushes its db and
    truncates its tables, so never the suite's own)."""
    from django.conf import settings

    database = os.environ.get("BENCH_DATABASE_URL") or settings.TEST_DATABASE_URL + "_bench"
    store = settings.TEST_STORE_URL.rsplit("/", 1)[0]
    broker = os.environ.get("BENCH_BROKER_URL") or f"{store}/13"
    return {**os.environ, "BENCH_DATABASE_URL": database, "BENCH_BROKER_URL": broker,
            "DJANGO_SETTINGS_MODULE": "config.settings"}


def test_smoke_run_of_bulk_replay_writes_its_rows_to_results_json(tmp_path: Path) -> None:
    # Given the smallest sizes, when bench/run.py runs bulk_replay alone
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--only", "bulk_replay", "--json", str(results)],
        cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=55)

    # Then it exits 0 whatever the figures, and the file has a row per figure and the machine
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(results.read_text())
    names = [f["name"] for f in data["figures"]]
    assert "bulk replay / raw kombu publish" in names
    assert "bulk replay peak RSS at N / at N/10" in names
    assert all(f["verdict"] in ("PASS", "MISS") and f["spread"] for f in data["figures"])
    assert data["mode"] == "smoke" and data["machine"]["cpu_count"] >= 1
    assert {m["name"]: m["status"] for m in data["modules"]}["bulk_replay"] == "ok"
    assert "bulk replay / raw kombu publish" in done.stdout


def test_smoke_run_of_the_admin_metrics_and_storm_figures(tmp_path: Path) -> None:
    # Given the smallest sizes, when bench/run.py runs the change list (with its parking
    # writer), the /metrics scrape and the escalation storm (real workers)
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--only", "changelist", "--only",
         "metrics_scrape", "--only", "escalation_storm", "--json", str(results)],
        cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=240)

    # Then every module gave its figures, each page its own p95 row, and the writer kept
    # its pace while the pages were measured
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(results.read_text())
    assert {m["name"]: m["status"] for m in data["modules"]} == {
        "changelist": "ok", "metrics_scrape": "ok", "escalation_storm": "ok"}
    figures = {f["name"]: f for f in data["figures"]}
    pages = [name for name in figures if name.startswith("change list p95: ")]
    assert len(pages) == 9 and "change list p95: unfiltered" in pages
    assert all(figures[name]["unit"] == "ms" and figures[name]["target"] == 150 for name in pages)
    assert re.search(r"writer: parked \d+ letters in [\d.]+ s \((4[5-9]|5[0-5])\.\d/s\)",
                     figures["change list p95: unfiltered"]["detail"])
    assert figures["/metrics scrape, uncached"]["target"] == 50
    storm = figures["escalation storm: parking rate (escalation on/off)"]
    assert storm["target_op"] == ">=" and storm["target"] == 0.9 and storm["value"] > 0
