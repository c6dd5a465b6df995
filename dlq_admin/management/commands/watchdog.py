"""``manage.py watchdog``: one sweep of the watchdog (``recovery.observe.watchdog``) from a shell.

    manage.py watchdog              find stuck work, recover what is safe, escalate the rest
    manage.py watchdog --dry-run    only report what a sweep would find
    manage.py watchdog --json       the report as JSON

For projects that run no Celery beat (run it from cron every few minutes) and for the
on-call. It asks the workers over the broker, so it needs the broker too. Exit status 1
when a check failed; 0 otherwise, even when stuck work was found (it was escalated).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from recovery.observe import watchdog


class Command(BaseCommand):
    help = "Run one watchdog sweep: stuck tasks, saga steps past their timeout, letters left " \
           "replaying, outbox messages not sent (docs/watchdog.md)."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true",
                            help="report only: dispatch, park and escalate nothing")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def handle(self, *args, **options):
        try:
            watchdog.policy()
        except ValueError as bad:
            raise CommandError(f"RECOVERY['WATCHDOG'] is invalid: {bad}") from None
        from celery import current_app

        from recovery.wiring import import_task_modules

        # Outside a worker the project's tasks are imported lazily; the deadlines of the
        # tasks the workers run are read from their classes.
        import_task_modules(current_app)
        report = watchdog.sweep(current_app, dry_run=options["dry_run"])
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            self.stdout.write(report.summary())
            if report.found and not report.dry_run:
                self.stdout.write("Open incidents: /admin/recovery/incident/ "
                                  "(runbook: docs/runbooks/watchdog-stuck-work.md)")
        if report.failed_checks:
            raise CommandError(f"checks that failed: {', '.join(report.failed_checks)} "
                               f"(see the log)")
