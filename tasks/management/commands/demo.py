"""``manage.py demo``: run the example workflows on a real worker and show what happened.

Starts a worker, sends every workflow in ``tasks.tasks.EXAMPLES``, waits for
each to succeed or be parked, prints a table, then serves the admin (unless
``--no-serve``). Works on the embedded default (SQLite + file broker) and on
PostgreSQL/Redis when DATABASE_URL/CELERY_BROKER_URL are set.

The worker runs in a session of its own (a Ctrl-C in the terminal reaches the demo only)
and is stopped however the demo ends: Ctrl-C, SIGTERM or SIGHUP (``kill``, a CI timeout,
a closed terminal) unwind through the ``finally`` that stops it, and on Linux the kernel
sends it SIGTERM if the demo dies without unwinding (SIGKILL).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from celery.result import AsyncResult
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from recovery.models import DeadLetter


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the worker, before exec: have Linux send it SIGTERM when the demo dies, even by
    SIGKILL, which runs no ``finally``. Elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Command(BaseCommand):
    help = "Run the example workflows on a worker, print what happened, serve the admin."

    def add_arguments(self, parser):
        parser.add_argument("--no-serve", action="store_true", help="Stop after the table.")
        parser.add_argument("--timeout", type=float, default=90.0,
                            help="Seconds to wait for the workflows (default 90).")
        parser.add_argument("--addrport", default="127.0.0.1:8000")

    def handle(self, *args, **options):
        from config.celery import app
        from tasks.tasks import EXAMPLES

        call_command("migrate", verbosity=0)
        password = self._demo_user()
        embedded = settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
        self.stdout.write(
            f"Database: {'SQLite (embedded)' if embedded else settings.DATABASES['default']['ENGINE']}"
            f" | broker: {settings.CELERY_BROKER_URL.split('@')[-1]}"
        )
        worker = None
        self._stop_on_signals()
        try:
            worker = self._start_worker(embedded)
            sent = [(task, args, kwargs, task.apply_async(args, kwargs))
                    for task, args, kwargs in EXAMPLES]
            self._wait(sent, options["timeout"], worker)
            self._print_table(sent)
            self._run_resilience(options["timeout"])
            self._run_sagas(options["timeout"])
            self._print_incidents()
            self._run_rehearsal(options["timeout"])
            if options["no_serve"]:
                return
            self.stdout.write(self.style.SUCCESS(
                f"\nAdmin: http://{options['addrport']}/admin/  login: demo / {password}\n"
                "Dead letters: http://{0}/admin/recovery/deadletter/\n"
                "On-call dashboard: http://{0}/admin/recovery/dashboard/  (Ctrl-C to stop)".format(
                    options["addrport"])
            ))
            call_command("runserver", options["addrport"], use_reloader=False)
        finally:
            # A second signal must not cut the worker's stop short.
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            if worker is not None:
                self._stop_worker(worker)

    @staticmethod
    def _stop_on_signals() -> None:
        """SIGTERM and SIGHUP end the demo as Ctrl-C does: through ``finally``."""
        def stop(signum, frame):
            raise SystemExit(128 + signum)

        for signum in _STOP_SIGNALS:
            signal.signal(signum, stop)

    def _demo_user(self) -> str:
        password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(9)
        user, _ = get_user_model().objects.get_or_create(
            username="demo", defaults={"is_staff": True, "is_superuser": True})
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        return password

    def _start_worker(self, embedded: bool) -> subprocess.Popen:
        # SQLite has one writer: a threads pool shares one process and its lock nicely.
        pool = ["-P", "threads", "-c", "4"] if embedded else ["-P", "prefork", "-c", "2"]
        log = Path(settings.VAR_DIR) / "demo-worker.log"
        handle = open(log, "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config.celery:app", "worker", "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat", *pool],
            cwd=settings.BASE_DIR, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.stdout.write(f"Started a worker (pid {process.pid}, {pool[1]} pool); its log: {log}")
        self.stdout.flush()
        process.log_path = log  # type: ignore[attr-defined]
        return process

    def _stop_worker(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def _wait(self, sent, timeout: float, worker) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise CommandError(f"the worker exited; see {worker.log_path}")
            if all(AsyncResult(r.id).state in ("SUCCESS", "FAILURE") for *_, r in sent):
                return
            time.sleep(0.5)
        raise CommandError(f"workflows did not finish in {timeout:g}s; see {worker.log_path}")

    def _run_resilience(self, timeout: float) -> None:
        """Circuit breaker, fallback and degraded mode (tasks/partners.py), step by step."""
        from recovery.workflows.circuit import Circuit
        from tasks import partners

        def run(task, *args):
            return task.apply_async(args).get(timeout=timeout)

        rows = [("task", "arguments", "outcome")] + partners.run_demo(run)
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        self.stdout.write("\nCircuit breaker, fallback and degraded mode (tasks/partners.py):\n")
        for index, row in enumerate(rows):
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
            if index == 0:
                self.stdout.write("  ".join("-" * width for width in widths))
        state = Circuit("partner-api").state()["state"].replace("_", "-")
        self.stdout.write(f"\nCircuit partner-api: {state} (python manage.py circuits; "
                          "reset it with: python manage.py circuits reset partner-api)")

    def _run_sagas(self, timeout: float) -> None:
        """The order saga (tasks/orders.py): one order ships, one is compensated."""
        from tasks import orders

        rows = [("run", "order", "status", "steps")] + orders.run_demo(timeout)
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        self.stdout.write("\nOrder saga (tasks/orders.py; python manage.py saga show <run>):\n")
        for index, row in enumerate(rows):
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
            if index == 0:
                self.stdout.write("  ".join("-" * width for width in widths))

    def _run_rehearsal(self, timeout: float) -> None:
        """A failure rehearsal of the order saga (docs/rehearsals.md): payment fails on
        purpose, the orders are compensated, the report shows each step's time."""
        from recovery.workflows import rehearsals
        from tasks import orders

        if not rehearsals.enabled():
            self.stdout.write("\nRehearsal: skipped (RECOVERY['REHEARSALS_ENABLED'] is off)")
            return
        self.stdout.write("\nRehearsal of the order saga: payment fails permanently for 30 s "
                          "(python manage.py rehearse start --task tasks.orders.charge_payment "
                          "--fault permanent --rate 1 --for 30s):\n")
        self.stdout.write(orders.run_rehearsal_demo(timeout))

    def _print_incidents(self) -> None:
        from recovery.models import Incident

        incidents = list(Incident.objects.exclude(status=Incident.Status.RESOLVED)
                         .order_by("first_seen_at"))
        self.stdout.write(f"\nIncidents open: {len(incidents)} (python manage.py incidents; "
                          "/admin/recovery/incident/; docs/escalation.md)")
        for incident in incidents:
            self.stdout.write(f"  #{incident.pk} {incident.severity:<8} {incident.reason:<20} "
                              f"{incident.title[:90]}")

    def _print_table(self, sent) -> None:
        rows = [("task", "arguments", "attempts", "outcome", "classification")]
        for task, args, kwargs, result in sent:
            name = task.name.rsplit(".", 1)[-1]
            arguments = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
            letter = DeadLetter.objects.filter(task_id=result.id).first()
            if letter is not None:
                rows.append((name, arguments, str(letter.attempts), "parked (dead letter)",
                             f"{letter.kind}, {'permanent' if letter.permanent else 'transient'}"))
                continue
            value = AsyncResult(result.id).result or {}
            attempts = value.get("attempts", 1) if isinstance(value, dict) else 1
            recovered = value.get("recovered_from", []) if isinstance(value, dict) else []
            outcome = "succeeded after retries" if attempts > 1 else "succeeded"
            rows.append((name, arguments, str(attempts), outcome,
                         ", ".join(f"{k}, transient" for k in recovered) or "-"))
        widths = [min(38, max(len(row[i]) for row in rows)) for i in range(len(rows[0]))]
        self.stdout.write("")
        for index, row in enumerate(rows):
            self.stdout.write("  ".join(cell[:38].ljust(width) for cell, width in zip(row, widths)))
            if index == 0:
                self.stdout.write("  ".join("-" * width for width in widths))
        parked = sum(1 for row in rows[1:] if row[3].startswith("parked"))
        self.stdout.write(f"\n{len(rows) - 1} workflows: {len(rows) - 1 - parked} succeeded, "
                          f"{parked} parked as dead letters.")
