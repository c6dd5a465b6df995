"""Parking rate during an escalation storm: N letters of one failure fingerprint, with
escalation on against escalation off, on real workers.

What: N tasks of ``bench.fail_recovery`` (one fingerprint: the same task, exception type
and normalised message) pre-queued, one prefork worker parks them. With escalation on
(``bench/storm_settings.py``: the default threshold rule, 10 letters in 15 minutes, and a
signed webhook to a receiver this process serves) the 10th letter opens an incident and
every later one is linked to it; with it off, no rule runs. Sides alternate round by
round (A,B then B,A); the figure is the median of the per-round ratios of parking rates
(letters/s from the FAILURE results' completion times), with their spread.
Target: ratio >= 0.9 (parking within 10% of no escalation). Each escalated side is also
checked: exactly one incident for the fingerprint, holding all N letters; none with it off.
(The incident's webhook is sent by the worker's delivery timer, which the side may stop
before it fires: the count received is printed, not required.)

Usage: python bench/escalation_storm.py [--mode full|quick|smoke]
Environment: as bench/throughput.py (BENCH_DATABASE_URL, BENCH_BROKER_URL).
"""

from __future__ import annotations

import argparse
import http.server
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import throughput  # noqa: E402  (sets the database and broker URLs)

# After throughput's import, which names the project's settings: these workers (and this
# process) run the storm's.
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.storm_settings"
os.environ.setdefault("BENCH_WEBHOOK_URL", "http://127.0.0.1:9/unused")  # the parent's import

TASK = "bench.fail_recovery"
TARGET = 0.9
SIZES = {"full": {"n": 10_000, "rounds": 3}, "quick": {"n": 1_000, "rounds": 3},
         "smoke": {"n": 100, "rounds": 2}}


class _Receiver:
    """The webhook's other end: counts the POSTs it is sent."""

    def __init__(self) -> None:
        self.received = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/incidents"

    def close(self) -> None:
        self.server.shutdown()


def _side(escalation: bool, n: int, receiver: _Receiver):
    def measure() -> float:
        from django.db import connection

        from recovery.models import Incident

        os.environ["BENCH_ESCALATION"] = "1" if escalation else "0"
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {Incident._meta.db_table} CASCADE")
        before = receiver.received
        rate, _ = throughput.run_side(TASK, n, 1, True)
        incidents = list(Incident.objects.all())
        if escalation:
            if len(incidents) != 1 or incidents[0].letters.count() != n:
                raise RuntimeError(f"escalated storm: expected one incident of {n} letters, "
                                   f"found {[(i.pk, i.letters.count()) for i in incidents]}")
        elif incidents:
            raise RuntimeError(f"escalation off, yet {len(incidents)} incident(s) opened")
        print(f"  escalation {'on ' if escalation else 'off'}: {rate:,.0f} letters/s"
              + (f", webhooks received {receiver.received - before}" if escalation else ""),
              flush=True)
        return rate

    return measure


def figures(mode: str) -> list:
    from bench.rounds import Figure, interleave, ratio_spread

    sizes = SIZES[mode]
    receiver = _Receiver()
    os.environ["BENCH_WEBHOOK_URL"] = receiver.url
    try:
        throughput.prepare()
        rounds = interleave([_side(False, sizes["n"], receiver),
                             _side(True, sizes["n"], receiver)], sizes["rounds"])
    finally:
        receiver.close()
    spread = ratio_spread(rounds, lambda off, on: on / off)
    rates = "; ".join(f"off {off:,.0f}, on {on:,.0f}" for off, on in rounds)
    return [Figure(name="escalation storm: parking rate (escalation on/off)",
                   value=spread.median, unit="x", target_op=">=", target=TARGET,
                   spread=(spread.low, spread.high),
                   detail=f"N={sizes['n']:,} letters of one fingerprint, {len(rounds)} rounds, "
                          f"letters/s {rates}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=tuple(SIZES), default="full")
    options = parser.parse_args()
    from bench.report import row, table

    found = figures(options.mode)
    print(table([row(f) for f in found], [f"  {f.name}: {f.detail}" for f in found]))


if __name__ == "__main__":
    main()
