"""``manage.py rehearse``: failure rehearsals from a shell (docs/rehearsals.md).

    manage.py rehearse start --task shop.tasks.charge --fault permanent --rate 0.2 --for 10m
                             [--kind dependency] [--message "card processor down"]
    manage.py rehearse list [--all] [--json]     running ones (--all: ended ones too)
    manage.py rehearse stop ID [ID ...] | --all
    manage.py rehearse report ID [--json]        what happened to every run it hit
    manage.py rehearse purge ID                  delete its letters and incidents

Refused unless ``RECOVERY["REHEARSALS_ENABLED"]`` (list, report and purge still work, to
clean up after one). Starting, stopping and purging are audit events (actor cli:<user>).
Exit status 1 with the reason on a bad request.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from dlq_admin.management.actor import cli_actor
from recovery.models import Rehearsal
from recovery.operations import rehearsal_report
from recovery.workflows import rehearsals


class Command(BaseCommand):
    help = "Start, list, stop, report on and purge failure rehearsals (see the module docstring)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="verb")
        start = sub.add_parser("start", help="inject a fault into matching tasks for a while")
        start.add_argument("--task", required=True,
                           help="a task name, or a pattern such as shop.tasks.*")
        start.add_argument("--fault", required=True, choices=rehearsals.FAULTS)
        start.add_argument("--rate", required=True, type=float,
                           help="probability that a matching run is hit, in (0, 1]")
        start.add_argument("--for", dest="duration", required=True,
                           help="how long it runs: 30s, 10m, 2h (24h at most)")
        start.add_argument("--kind", default="dependency", choices=rehearsals.KINDS,
                           help="what the injected failure is classified as")
        start.add_argument("--message", default="", help="added to the injected error")
        listing = sub.add_parser("list", help="running rehearsals")
        listing.add_argument("--all", action="store_true", help="ended ones too")
        listing.add_argument("--json", action="store_true")
        stop = sub.add_parser("stop", help="stop rehearsals now")
        stop.add_argument("ids", type=int, nargs="*")
        stop.add_argument("--all", action="store_true", help="every running rehearsal")
        show = sub.add_parser("report", help="what happened to every run a rehearsal hit")
        show.add_argument("id", type=int)
        show.add_argument("--json", action="store_true")
        purge = sub.add_parser("purge", help="delete a rehearsal's letters and incidents")
        purge.add_argument("id", type=int)

    def handle(self, *args, **options):
        verb = options.get("verb")
        if verb is None:
            options.update({"all": False, "json": False})
            verb = "list"
        return getattr(self, f"do_{verb}")(options)

    @staticmethod
    def _get(pk: int) -> Rehearsal:
        try:
            return Rehearsal.objects.get(pk=pk)
        except Rehearsal.DoesNotExist:
            raise CommandError(f"rehearsal {pk} does not exist") from None

    def do_start(self, options):
        try:
            duration = rehearsals.parse_duration(options["duration"])
            started = rehearsals.start(
                task=options["task"], fault=options["fault"], rate=options["rate"],
                duration=duration, kind=options["kind"], message=options["message"],
                actor=cli_actor())
        except (ValueError, rehearsals.RehearsalsDisabled) as refused:
            raise CommandError(str(refused)) from None
        self.stdout.write(
            f"rehearsal {started.pk} started: {started.fault} into {started.task} at rate "
            f"{started.rate:g} until {timezone.localtime(started.expires_at):%Y-%m-%d %H:%M:%S %Z}"
            f"\nworkers see it within {rehearsals.READ_INTERVAL_SECONDS:g} s; "
            f"stop it with: manage.py rehearse stop {started.pk}")

    def do_list(self, options):
        query = Rehearsal.objects.all() if options.get("all") else Rehearsal.objects.filter(
            stopped_at__isnull=True, expires_at__gt=timezone.now())
        found = list(query[:200])
        if options.get("json"):
            self.stdout.write(json.dumps([{
                "id": r.pk, "task": r.task, "fault": r.fault, "rate": r.rate, "kind": r.kind,
                "started_at": r.started_at, "expires_at": r.expires_at,
                "stopped_at": r.stopped_at, "started_by": r.started_by,
                "running": r.is_running()} for r in found], default=str, indent=2))
            return
        if not found:
            self.stdout.write("no rehearsal is running" if not options.get("all")
                              else "no rehearsal yet")
            return
        for r in found:
            state = "running until" if r.is_running() else "ended"
            self.stdout.write(f"{r.pk:>5}  {r.fault:<9} {r.rate:>5g}  {r.task:<40} {state} "
                              f"{timezone.localtime(r.ended_at):%Y-%m-%d %H:%M:%S}  "
                              f"by {r.started_by}")

    def do_stop(self, options):
        if options.get("all") == bool(options.get("ids")):
            raise CommandError("name the rehearsals to stop, or --all")
        ids = None if options.get("all") else options["ids"]
        if ids is not None:
            missing = set(ids) - set(Rehearsal.objects.filter(pk__in=ids).values_list("pk", flat=True))
            if missing:
                raise CommandError(f"no such rehearsal: {', '.join(map(str, sorted(missing)))}")
        stopped = rehearsals.stop(ids, actor=cli_actor())
        if not stopped:
            self.stdout.write("nothing to stop: no such rehearsal is running")
        for r in stopped:
            self.stdout.write(f"rehearsal {r.pk} stopped")

    def do_report(self, options):
        found = rehearsal_report.report(self._get(options["id"]))
        if options.get("json"):
            self.stdout.write(json.dumps(found.to_dict(), default=str, indent=2))
        else:
            self.stdout.write(rehearsal_report.format_report(found))

    def do_purge(self, options):
        rehearsal = self._get(options["id"])
        try:
            counts = rehearsal_report.purge(rehearsal, actor=cli_actor())
        except rehearsal_report.RehearsalRunning as refused:
            raise CommandError(str(refused)) from None
        self.stdout.write(f"rehearsal {rehearsal.pk}: deleted {counts['letters']} letters and "
                          f"{counts['incidents']} incidents")
