"""``manage.py saga``: saga runs from a shell.

    manage.py saga list [--status S] [--name NAME] [--needs-human] [--limit N]
    manage.py saga show ID [--reveal]                    context and errors masked unless --reveal
    manage.py saga resume ID [--note TEXT] [--yes]       from the failed step (held, failed)
    manage.py saga compensate ID [--note TEXT] [--yes]   undo (held, needs_human, succeeded)
    manage.py saga reconcile [--older-than SECONDS]      outcomes the workers could not record

Every operation goes through recovery.workflows.sagas, the same service as the admin: the run is
locked, the change audited (a SagaEvent, actor cli:<user>). Exit status 1 when refused.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.timesince import timesince

from dlq_admin.management.actor import cli_actor
from dlq_admin.reveals import record_saga_reveal
from recovery.workflows import saga_secrets, sagas
from recovery.models import SagaRun


def _duration(start, end) -> str:
    if not start:
        return "-"
    seconds = ((end or timezone.now()) - start).total_seconds()
    return f"{seconds:.2f}s" if seconds < 120 else timesince(start, end or timezone.now())


def _at(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


class Command(BaseCommand):
    help = "List, show, resume and compensate saga runs (see the module docstring)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="verb", required=True)
        listing = sub.add_parser("list", help="runs, newest first")
        listing.add_argument("--status", choices=SagaRun.Status.values)
        listing.add_argument("--name", help="saga name")
        listing.add_argument("--needs-human", action="store_true",
                             help="runs waiting for an operator: held or needs_human")
        listing.add_argument("--limit", type=int, default=50)
        show = sub.add_parser("show", help="a run with its steps, timings, errors and events")
        show.add_argument("id", type=int)
        show.add_argument("--reveal", action="store_true",
                          help="show the context, step results and errors unmasked")
        for verb, text in (("resume", "run a held or failed run again from its failed step"),
                           ("compensate", "undo a held, needs_human or succeeded run")):
            p = sub.add_parser(verb, help=text)
            p.add_argument("id", type=int)
            p.add_argument("--note", default="", help="recorded in the audit trail")
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        reconcile = sub.add_parser("reconcile", help="record step outcomes the workers missed")
        reconcile.add_argument("--older-than", type=float, default=60.0,
                               help="only steps dispatched longer ago than this (seconds)")

    def _run(self, pk: int) -> SagaRun:
        try:
            return SagaRun.objects.get(pk=pk)
        except SagaRun.DoesNotExist:
            raise CommandError(f"no saga run with id {pk}") from None

    def handle(self, *args, **options):
        getattr(self, f"_{options['verb']}")(options)

    def _list(self, options):
        runs = SagaRun.objects.all()
        if options["status"]:
            runs = runs.filter(status=options["status"])
        if options["name"]:
            runs = runs.filter(name=options["name"])
        if options["needs_human"]:
            runs = runs.filter(status__in=(SagaRun.Status.HELD, SagaRun.Status.NEEDS_HUMAN))
        self.stdout.write(f"{'id':>7}  {'saga':<20} {'status':<12} {'step':>4}  {'version':<12} "
                          f"{'age':<14} error")
        for run in runs.order_by("-created_at", "-pk")[: options["limit"]]:
            step = "-" if run.current_step is None else str(run.current_step)
            self.stdout.write(f"{run.pk:>7}  {run.name[:20]:<20} {run.status:<12} {step:>4}  "
                              f"{run.version[:12]:<12} {timesince(run.created_at)[:14]:<14} "
                              f"{saga_secrets.scrub(run.error, saga_secrets.hidden(run))[:80]}")

    def _show(self, options):
        run = self._run(options["id"])
        rows = list(run.steps.order_by("index", "-role"))
        reveal = options.get("reveal", False)
        if reveal:
            record_saga_reveal(run.pk, actor=cli_actor(), via="saga show --reveal")
        values = [] if reveal else saga_secrets.hidden(
            run, [row.result for row in rows if row.result is not None])
        context = run.context if reveal else saga_secrets.masked(run, run.context)
        self.stdout.write(f"run {run.pk}  {run.name}  version {run.version}  {run.status}")
        self.stdout.write(f"  on failure: {run.definition.get('on_failure')}   idempotency key: "
                          f"{run.idempotency_key or '-'}")
        self.stdout.write(f"  created {_at(run.created_at)}   updated {_at(run.updated_at)}   "
                          f"finished {_at(run.finished_at)}")
        if run.error:
            self.stdout.write(f"  error: {saga_secrets.scrub(run.error, values)}")
        self.stdout.write("  context: " + json.dumps(context, default=str, ensure_ascii=False))
        self.stdout.write("  steps:")
        self.stdout.write(f"    {'#':>2} {'role':<12} {'status':<11} {'task':<40} {'task id':<32} "
                          f"{'disp':>4} {'runs':>4}  {'started':<19}  {'took':>8}  error")
        for row in rows:
            self.stdout.write(
                f"    {row.index:>2} {row.role:<12} {row.status:<11} {row.task_name[-40:]:<40} "
                f"{(row.task_id or '-'):<32} {row.dispatches:>4} {row.attempts:>4}  "
                f"{_at(row.started_at):<19}  {_duration(row.started_at, row.finished_at):>8}  "
                f"{saga_secrets.scrub(row.error, values)[:120]}")
        events = list(run.events.all())
        if events:
            self.stdout.write("  events:")
            for event in events:
                self.stdout.write(f"    {_at(event.at)}  {event.action:<11} {event.actor:<16} "
                                  f"{event.outcome}{'  note: ' + event.note if event.note else ''}")

    def _operate(self, options, verb: str):
        run = self._run(options["id"])
        if not options["yes"]:
            answer = self._ask(f"{verb.capitalize()} saga {run.name} run {run.pk} ({run.status})? "
                               f"[y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("aborted; nothing changed")
        try:
            run = getattr(sagas, verb)(run, actor=cli_actor(), note=options["note"])
        except sagas.SagaError as exc:
            raise CommandError(str(exc)) from None
        event = run.events.first()
        self.stdout.write(f"Run {run.pk} is {run.status}: {event.outcome if event else ''}")

    @staticmethod
    def _ask(question: str) -> str:
        try:
            return input(question)
        except EOFError:
            raise CommandError("no terminal to confirm on; add --yes; nothing changed") from None

    def _resume(self, options):
        self._operate(options, "resume")

    def _compensate(self, options):
        self._operate(options, "compensate")

    def _reconcile(self, options):
        settled = sagas.reconcile(older_than_seconds=options["older_than"])
        self.stdout.write(f"Settled {settled} step{'s' if settled != 1 else ''}.")
