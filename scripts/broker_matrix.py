"""Print the broker matrix of the last `make test`: each integration test, on each broker,
passed / skipped (with the reason) / failed, and its time, read from the JUnit XML files
the Makefile's legs write (var/junit-<broker>.xml).

Usage: python scripts/broker_matrix.py [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROKERS = ("redis", "rabbitmq", "sqs")


def read(path: Path) -> dict[str, tuple[str, float, str]]:
    """test id -> (outcome, seconds, detail) for the integration tests in one report."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        if not module.startswith("tests.integration."):
            continue
        test_id = f"{module.removeprefix('tests.integration.')}::{case.get('name')}"
        seconds = float(case.get("time") or 0)
        if case.find("failure") is not None or case.find("error") is not None:
            outcome, detail = "FAIL", ""
        elif (skipped := case.find("skipped")) is not None:
            message = skipped.get("message") or ""
            # only_on's reasons end "(holds on amqp only)": that part says it in a cell.
            holds = message.rsplit("(holds on ", 1)
            outcome, detail = "skip", ("holds on " + holds[1].rstrip(")") if len(holds) == 2
                                       else message[:60])
        else:
            outcome, detail = "pass", ""
        results[test_id] = (outcome, seconds, detail)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args()
    legs = {broker: read(path) for broker in BROKERS
            if (path := ROOT / "var" / f"junit-{broker}.xml").exists()}
    if not legs:
        print("no var/junit-*.xml: run `make test` first", file=sys.stderr)
        return 1
    tests = sorted(set().union(*legs.values()))
    header = ["test", *legs]
    rows = []
    for test in tests:
        cells = []
        for broker in legs:
            # Not in a run: a broker_independent test outside the Redis run.
            outcome, seconds, detail = legs[broker].get(test, ("-", 0.0, "Redis run only"))
            cells.append(f"{outcome} {seconds:.1f}s" if outcome in ("pass", "FAIL")
                         else f"{outcome} ({detail})")
        rows.append([test, *cells])
    totals = ["total"]
    for broker, results in legs.items():
        counts = {kind: sum(1 for o, _, _ in results.values() if o == kind)
                  for kind in ("pass", "skip", "FAIL")}
        seconds = sum(s for _, s, _ in results.values())
        totals.append(f"{counts['pass']} pass, {counts['skip']} skip, {counts['FAIL']} fail, "
                      f"{seconds:.0f}s")
    rows.append(totals)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    return 1 if any(o == "FAIL" for leg in legs.values() for o, _, _ in leg.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
