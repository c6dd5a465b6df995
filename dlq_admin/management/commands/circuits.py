"""``manage.py circuits``: see and steer the circuit breakers every worker shares.

    manage.py circuits [list] [--json]        every known circuit and its state
    manage.py circuits reset NAME             close it now (the dependency is back)
    manage.py circuits trip NAME [--seconds N]
                                              open it now (take the dependency out of use)
                                              for N seconds, default its policy's open_seconds

Known circuits are those in RECOVERY["CIRCUITS"] and those a registered task declares
(dependency="..."); a circuit used only through recovery.workflows.circuit.guard() can be reset or
tripped once it has a record. The same operations are on the admin page
/admin/recovery/sharedstate/. See docs/runbooks/circuit-stuck-open.md.
"""

from __future__ import annotations

import json
import logging

from django.core.management.base import BaseCommand, CommandError

from dlq_admin.management.actor import cli_actor
from dlq_admin.resilience import NAME, circuit_row, circuit_rows, known_circuits
from recovery.workflows.circuit import Circuit

logger = logging.getLogger("recovery.circuit")


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def _policy(policy) -> str:
    if policy is None:
        return "-"
    return (f"opens at {policy.failure_rate_threshold:.0%} of >= {policy.minimum_calls} calls "
            f"in {policy.window_seconds:g}s; open {policy.open_seconds:g}s; "
            f"{policy.half_open_max_calls} trial(s)")


class Command(BaseCommand):
    help = "List, reset and trip circuit breakers (see the module docstring)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="verb")
        listing = sub.add_parser("list", help="every known circuit and its state")
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        reset = sub.add_parser("reset", help="close a circuit now")
        reset.add_argument("name")
        trip = sub.add_parser("trip", help="open a circuit now")
        trip.add_argument("name")
        trip.add_argument("--seconds", type=float,
                          help="how long it stays open (default: its policy's open_seconds)")

    def handle(self, *args, **options):
        verb = options.get("verb") or "list"
        return getattr(self, f"do_{verb}")(options)

    def do_list(self, options):
        rows = circuit_rows()
        if options.get("json"):
            self.stdout.write(json.dumps([{
                "name": row.name, "state": row.state, "open_until": row.open_until,
                "calls_in_window": row.calls, "failures_in_window": row.failures,
                "times_opened": row.opened, "error": row.error,
            } for row in rows], default=str, indent=2))
            return
        if not rows:
            self.stdout.write("No circuits: none in RECOVERY['CIRCUITS'] and no task declares "
                              "dependency=.")
            return
        self.stdout.write(f"{'circuit':<24} {'state':<18} {'open until':<21} "
                          f"{'calls/failed':>12} {'opened':>6}  policy")
        for row in rows:
            state = row.label if not row.error else f"unknown: {row.error}"
            self.stdout.write(f"{row.name:<24} {state:<18} {_when(row.open_until):<21} "
                              f"{f'{row.calls}/{row.failures}':>12} {row.opened:>6}  "
                              f"{_policy(row.policy)}")

    def _circuit(self, name: str) -> Circuit:
        if not NAME.match(name):
            raise CommandError(f"{name!r} is not a circuit name (letters, digits, . _ : -)")
        breaker = Circuit(name)
        try:
            has_record = bool(breaker.store.get(breaker.key))
        except Exception as exc:  # noqa: BLE001
            raise CommandError(f"the shared state cannot be reached: {exc}") from None
        if name not in known_circuits() and not has_record:
            known = ", ".join(known_circuits()) or "none"
            raise CommandError(f"no circuit {name!r}; known circuits: {known}")
        return breaker

    def do_reset(self, options):
        breaker = self._circuit(options["name"])
        breaker.reset()
        logger.warning("recovery: circuit %s reset (closed) by %s", breaker.name, cli_actor())
        self.stdout.write(f"Circuit {breaker.name} is closed: calls go through again.")

    def do_trip(self, options):
        seconds = options.get("seconds")
        if seconds is not None and seconds <= 0:
            raise CommandError("--seconds must be positive")
        breaker = self._circuit(options["name"])
        breaker.trip(seconds=seconds)
        logger.warning("recovery: circuit %s tripped (open) by %s", breaker.name, cli_actor())
        row = circuit_row(breaker.name)
        self.stdout.write(f"Circuit {breaker.name} is open until {_when(row.open_until)}: tasks "
                          f"that depend on it are deferred or use their fallback.")
