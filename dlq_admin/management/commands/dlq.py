"""``manage.py dlq``: the dead-letter queue from a shell, for bulk work and for 3 a.m.

    manage.py dlq list [filters]             manage.py dlq show ID
    manage.py dlq replay [filters] [--queue Q] [--rate N] [--batch-size N] [--note TEXT]
                         [--rerun-effects] [--dry-run] [--yes]
    manage.py dlq discard|resolve|compensate [filters] [--batch-size N] [--note TEXT]
                         [--dry-run] [--yes]
    manage.py dlq purge [filters] [--older-than 30d] [--include-parked] [--dry-run] [--yes]
    manage.py dlq export [filters] [--format jsonl|csv] [--output FILE] [--reveal]
    manage.py dlq export [filters] --to kafka://host:9092/topic [--no-events] [--timeout S]
    manage.py dlq import --from FILE.jsonl|-|kafka://host:9092/topic [--group-id G]
                         [--max-messages N] [--timeout S] [--batch-size N]
    manage.py dlq stats                      manage.py dlq drain

Filters: --ids 1,2,3 --task-id ID --task NAME --kind KIND --status STATUS --fingerprint SHA1
--rehearsal ID
--since/--until (ISO date or time, or 30m/6h/2d ago) --limit N. Every operation goes
through recovery.operations.replay, so it is locked, audited (actor cli:<user>) and the same as in
the admin. Exit status 1 when some letters could not be handled.

Kafka (``--to``/``--from kafka://``): one record per letter keyed by task id, masked, with
Spring Kafka's dead-letter headers; credentials from RECOVERY_KAFKA_SASL_USERNAME and
RECOVERY_KAFKA_SASL_PASSWORD. Needs confluent-kafka, and is not tested against a running
broker: see docs/kafka.md. ``import`` upserts by task id (a second run changes nothing),
never overwrites a letter of this database and never imports an audit trail.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from django.db.models import Count
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from dlq_admin.management.actor import cli_actor
from dlq_admin.reveals import BATCH_SIZE, record_reveals
from recovery.core import redaction
from recovery.operations import replay as service
from recovery.operations.effects_rerun import mark_all_effects_rerun
from recovery.models import DeadLetter
from recovery.store import export, importing, kafka
from recovery.store.parking import drain_spool, spool

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _moment(text: str) -> datetime:
    match = _AGO.match(text.strip())
    if match:
        return timezone.now() - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    parsed = parse_datetime(text)
    if parsed is None:
        day = parse_date(text)
        if day is not None:
            parsed = datetime(day.year, day.month, day.day)
    if parsed is None:
        raise CommandError(f"cannot read {text!r} as a time: use 2026-11-28, 2026-11-28T10:00 or 6h")
    return timezone.make_aware(parsed) if timezone.is_naive(parsed) else parsed


def _create_private(path: str) -> int:
    """A new file at ``path`` readable by its owner only (even masked, an export holds
    payloads), opened for writing: never an existing file, never through a symlink
    someone planted there (``O_EXCL | O_NOFOLLOW``)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} already exists (a file or a symlink); export to a new "
                           f"path, nothing was written") from None
    except OSError as exc:
        raise CommandError(f"cannot create {path}: {exc.strerror}") from None
    os.fchmod(descriptor, 0o600)  # whatever the umask
    return descriptor


class Command(BaseCommand):
    help = ("Inspect, replay, discard and resolve dead letters; export them to a file or a Kafka "
            "topic and import them back (Kafka: docs/kafka.md; see the module docstring).")

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="verb", required=True)

        def filtered(name, help_text):
            p = sub.add_parser(name, help=help_text)
            p.add_argument("--ids", help="comma-separated letter ids")
            p.add_argument("--task-id", help="Celery task id (e.g. <id>.compensation)")
            p.add_argument("--task", help="task name")
            p.add_argument("--kind", choices=DeadLetter.Kind.values)
            p.add_argument("--status", choices=DeadLetter.Status.values)
            p.add_argument("--fingerprint")
            p.add_argument("--rehearsal", type=int,
                           help="letters a failure rehearsal parked (manage.py rehearse)")
            p.add_argument("--since", help="last failure at or after (ISO time, or 30m/6h/2d)")
            p.add_argument("--until", help="last failure before (ISO time, or 30m/6h/2d)")
            p.add_argument("--limit", type=int)
            return p

        filtered("list", "list letters, newest failure first")
        show = sub.add_parser("show", help="everything about one letter (secrets masked)")
        show.add_argument("id", type=int)
        show.add_argument("--reveal", action="store_true", help="show secrets unmasked")
        for verb in ("replay", "discard", "resolve", "compensate"):
            p = filtered(verb, f"{verb} parked letters")
            p.add_argument("--dry-run", action="store_true", help="say what would happen")
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
            p.add_argument("--batch-size", type=int, default=500)
            p.add_argument("--note", default="", help="recorded in the audit trail")
            if verb == "replay":
                p.add_argument("--queue", help="publish to this queue instead of the original")
                p.add_argument("--rate", type=float, help="at most N letters per second")
                p.add_argument("--rerun-effects", action="store_true",
                               help="run the effects the tasks already committed (self.effect) "
                                    "again instead of skipping them; audited per letter")
        purge = filtered("purge", "delete closed letters past their retention (never parked "
                                  "ones unless --include-parked)")
        purge.add_argument("--older-than", help="closed (last updated) longer ago than this, "
                           "e.g. 30d; default: RECOVERY['RETENTION_DAYS'] per status")
        purge.add_argument("--include-parked", action="store_true",
                           help="also delete parked letters (failures nobody handled)")
        purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        purge.add_argument("--batch-size", type=int, default=1000)
        out = filtered("export", "write letters as JSON lines or CSV, or to a Kafka topic "
                                 "(secrets masked; Kafka: see docs/kafka.md)")
        out.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
        target = out.add_mutually_exclusive_group()
        target.add_argument("--output", "-o", help="file to write (default: standard output)")
        target.add_argument("--to", metavar="KAFKA_URL",
                            help="kafka://host:9092[,host2:9092]/topic[?security.protocol=...]: "
                                 "one record per letter keyed by task id, with Spring Kafka's "
                                 "kafka_dlt-* headers (never --reveal; not tested against a "
                                 "running broker here)")
        out.add_argument("--reveal", action="store_true", help="write secrets unmasked (files only)")
        out.add_argument("--no-events", action="store_true",
                         help="leave out the audit trail (jsonl and Kafka)")
        out.add_argument("--timeout", type=float, default=60.0,
                         help="Kafka: seconds to wait for the broker to confirm each letter")
        into = sub.add_parser(
            "import", help="read letters back from a JSON lines export or a Kafka topic, upserted "
                           "by task id (secrets stay masked; see docs/kafka.md)")
        into.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                          help="a JSON lines file from `dlq export`, - for standard input, or "
                               "kafka://host:9092/topic")
        into.add_argument("--group-id", help="Kafka: the consumer group (default: a new one, "
                                             "which reads the topic from its start)")
        into.add_argument("--max-messages", type=int, help="Kafka: read at most this many records")
        into.add_argument("--timeout", type=float, default=30.0,
                          help="Kafka: stop after this many seconds without a record")
        into.add_argument("--batch-size", type=int, default=500,
                          help="records per database transaction")
        into.add_argument("--max-record-bytes", type=int, default=importing.MAX_RECORD_BYTES,
                          help="skip records larger than this")
        sub.add_parser("stats", help="counts by status, kind and task")
        drain = sub.add_parser("drain", help="move spooled letters into the database now")
        drain.add_argument("--requeue-quarantined", action="store_true",
                           help="first put quarantined records (*.bad) back in line, once "
                                "what refused them is fixed")

    # -- helpers ------------------------------------------------------------------------

    def _queryset(self, options):
        qs = DeadLetter.objects.all()
        if options.get("ids"):
            try:
                ids = [int(part) for part in options["ids"].split(",") if part.strip()]
            except ValueError:
                raise CommandError("--ids takes comma-separated numbers, e.g. --ids 4,8,15") from None
            qs = qs.filter(pk__in=ids)
        for option, lookup in (("task", "task_name"), ("task_id", "task_id"),
                               ("kind", "kind"), ("status", "status"),
                               ("fingerprint", "fingerprint")):
            if options.get(option):
                qs = qs.filter(**{lookup: options[option]})
        if options.get("rehearsal") is not None:
            qs = qs.filter(rehearsal=str(options["rehearsal"]))
        if options.get("since"):
            qs = qs.filter(last_failed_at__gte=_moment(options["since"]))
        if options.get("until"):
            qs = qs.filter(last_failed_at__lt=_moment(options["until"]))
        return qs

    @staticmethod
    def _ask(question: str) -> str:
        try:
            return input(question)
        except EOFError:
            raise CommandError("no terminal to confirm on; add --yes (after a --dry-run) to "
                               "run without asking; nothing changed") from None

    # -- verbs ----------------------------------------------------------------------------

    def handle(self, *args, **options):
        return getattr(self, f"do_{options['verb']}")(options)

    def do_list(self, options):
        qs = self._queryset(options).order_by("-last_failed_at")
        if options.get("limit"):
            qs = qs[: options["limit"]]
        self.stdout.write(f"{'id':>7}  {'status':<11} {'kind':<18} {'att':>3} {'rep':>3}  "
                          f"{'last failed':<19}  task / exception")
        for letter in qs.iterator(chunk_size=1000):
            message = redaction.shown_letter(letter).exception_message
            self.stdout.write(
                f"{letter.pk:>7}  {letter.status:<11} {letter.kind:<18} {letter.attempts:>3} "
                f"{letter.replay_count:>3}  {letter.last_failed_at:%Y-%m-%d %H:%M:%S}  "
                f"{letter.task_name}: {letter.exception_type}: "
                f"{message[:80].splitlines()[0] if message else ''}"
            )

    def do_show(self, options):
        try:
            letter = DeadLetter.objects.get(pk=options["id"])
        except DeadLetter.DoesNotExist:
            raise CommandError(f"no dead letter with id {options['id']}") from None
        if options.get("reveal"):
            record_reveals([letter.pk], actor=cli_actor(), via="dlq show --reveal")
        data = export.letter_record(letter, reveal=options.get("reveal", False))
        self.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False))

    def _bulk(self, verb, options):
        qs = self._queryset(options).filter(status=DeadLetter.Status.PARKED)
        if options.get("limit"):
            ids = list(qs.order_by("pk").values_list("pk", flat=True)[: options["limit"]])
            qs = DeadLetter.objects.filter(pk__in=ids)
        count = qs.count()
        if count == 0:
            self.stdout.write(f"No parked letters match; nothing to {verb}.")
            return
        if options["dry_run"]:
            self.stdout.write(f"Would {verb} {count} parked letter{'s' if count != 1 else ''}:")
            for letter in qs.order_by("pk")[:20]:
                self.stdout.write(f"  {letter.pk}  {letter.task_name}  {letter.exception_type}")
            if count > 20:
                self.stdout.write(f"  ... and {count - 20} more")
            return
        if not options["yes"]:
            answer = self._ask(f"{verb.capitalize()} {count} parked letter{'s' if count != 1 else ''}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("aborted; nothing changed")

        if options.get("rerun_effects"):
            marked = mark_all_effects_rerun(qs, actor=cli_actor(), note=options["note"])
            self.stdout.write(f"{marked} letter{'s' if marked != 1 else ''} will run "
                              f"{'their' if marked != 1 else 'its'} effects again.")

        def progress(result):
            self.stderr.write(f"  {result.done + result.failed}/{count} "
                              f"({result.done} ok, {result.failed} failed)")

        try:
            result = service.bulk(
                verb, qs, actor=cli_actor(), batch_size=options["batch_size"],
                rate=options.get("rate"), queue=options.get("queue"), note=options["note"],
                progress=progress,
            )
        except service.ReplayError as exc:  # e.g. --queue names a queue the app does not know
            raise CommandError(f"{exc}; nothing changed") from None
        past = {"replay": "replayed", "discard": "discarded", "resolve": "resolved",
                "compensate": "compensated"}[verb]
        self.stdout.write(f"{past.capitalize()} {result.done} letter{'s' if result.done != 1 else ''}"
                          f"; {result.failed} failed.")
        for error in result.errors[:50]:
            self.stderr.write(f"  {error}")
        if not result.ok:
            raise CommandError(f"{result.failed} letter(s) could not be {past}")

    def do_replay(self, options):
        self._bulk("replay", options)

    def do_discard(self, options):
        self._bulk("discard", options)

    def do_resolve(self, options):
        self._bulk("resolve", options)

    def do_compensate(self, options):
        self._bulk("compensate", options)

    def do_purge(self, options):
        from recovery.store import retention

        try:
            plan = retention.plan(
                self._queryset(options), status=options.get("status"),
                older_than=_moment(options["older_than"]) if options.get("older_than") else None,
                include_parked=options["include_parked"],
            )
        except retention.RetentionError as exc:
            raise CommandError(str(exc)) from None
        if options.get("limit"):
            ids = list(plan.queryset.order_by("pk").values_list("pk", flat=True)[: options["limit"]])
            plan = plan.narrowed(DeadLetter.objects.filter(pk__in=ids))
        count = plan.queryset.count()
        self.stdout.write(plan.describe())
        if count == 0:
            self.stdout.write("No letters match; nothing to purge.")
            if not options["dry_run"]:
                # Still forget stale delivery counts: a routine purge usually finds no letter.
                retention.purge(plan, batch_size=options["batch_size"], actor=cli_actor())
            return
        if options["dry_run"]:
            self.stdout.write(f"Would delete {count} letter{'s' if count != 1 else ''} "
                              f"and their audit events.")
            return
        if not options["yes"]:
            answer = self._ask(f"Delete {count} letter{'s' if count != 1 else ''} and their audit "
                           f"events for good? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("aborted; nothing deleted")

        def progress(deleted):
            self.stderr.write(f"  {deleted}/{count} deleted")

        deleted = retention.purge(plan, batch_size=options["batch_size"], progress=progress,
                                  actor=cli_actor())
        self.stdout.write(f"Purged {deleted} letter{'s' if deleted != 1 else ''}.")

    def do_export(self, options):
        qs = self._queryset(options).order_by("pk")
        if options.get("limit"):
            qs = qs[: options["limit"]]
        if options.get("to"):
            self._export_to_kafka(qs, options)
            return
        writer = export.write_csv if options["format"] == "csv" else export.write_jsonl
        kwargs = {} if options["format"] == "csv" else {"events": not options["no_events"]}
        # The file is created first (a refused path reveals nothing), then the reveals are
        # audited, streamed in batches, before any letter is written.
        descriptor = _create_private(options["output"]) if options.get("output") else None
        if options["reveal"]:
            record_reveals(qs.values_list("pk", flat=True).iterator(chunk_size=BATCH_SIZE),
                           actor=cli_actor(), via="dlq export --reveal")
        if descriptor is not None:
            with open(descriptor, "w", encoding="utf-8", newline="") as out:
                written = writer(qs, out, reveal=options["reveal"], **kwargs)
        else:
            written = writer(qs, self.stdout, reveal=options["reveal"], **kwargs)
        self.stderr.write(f"Exported {written} letter{'s' if written != 1 else ''}"
                          f"{' (secrets revealed)' if options['reveal'] else ' (secrets masked)'}.")

    @staticmethod
    def _kafka_url(text: str) -> kafka.KafkaURL:
        try:
            url = kafka.parse_url(text)
            url.client_config()  # credentials the URL's settings need
        except kafka.KafkaURLError as exc:
            raise CommandError(f"{exc}; nothing was sent or read") from None
        return url

    def _export_to_kafka(self, qs, options):
        if options["reveal"]:
            raise CommandError("--reveal writes to files only: every reader of a topic would see "
                               "the secrets; nothing was sent")
        if options["format"] != "jsonl":
            raise CommandError("--to kafka:// sends JSON records; leave out --format csv")
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be more than 0 seconds; nothing was sent")
        url = self._kafka_url(options["to"])
        try:
            sent = kafka.export_letters(qs, url, events=not options["no_events"],
                                        timeout_seconds=options["timeout"])
        except (kafka.KafkaUnavailable, kafka.KafkaClientError) as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"Exported {sent} letter{'s' if sent != 1 else ''} to {url} "
                          f"(secrets masked).")

    def do_import(self, options):
        source = options["source"]
        if (options["batch_size"] < 1 or options["max_record_bytes"] < 1
                or (options.get("max_messages") is not None and options["max_messages"] < 1)):
            raise CommandError("--batch-size, --max-record-bytes and --max-messages must be at "
                               "least 1; nothing was read")
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be more than 0 seconds; nothing was read")
        if kafka.is_kafka_url(source):
            url = self._kafka_url(source)
            try:
                report = kafka.import_letters(
                    url, actor=cli_actor(), group_id=options.get("group_id"),
                    max_messages=options.get("max_messages"), idle_seconds=options["timeout"],
                    batch_size=options["batch_size"],
                    max_record_bytes=options["max_record_bytes"])
            except (kafka.KafkaUnavailable, kafka.KafkaClientError) as exc:
                raise CommandError(f"{exc}; the batches committed before stay imported") from None
            except DatabaseError as exc:
                raise CommandError(f"the database refused a batch ({exc}); its offsets are not "
                                   f"committed, so a re-run reads it again") from None
            problems = [report.incomplete, report.commit_error]
            described = f"{report.read} record{'s' if report.read != 1 else ''} read from {url}"
        else:
            report = self._import_file(source, options)
            problems = []
            described = f"from {source}"
        self.stdout.write(f"Imported {described}: {report.summary()}.")
        for line in report.kept[:50]:
            self.stderr.write(f"  kept {line}")
        for line in report.skipped[:50]:
            self.stderr.write(f"  skipped {line}")
        for problem in filter(None, problems):
            self.stderr.write(f"  {problem}")
        if not report.ok:
            failures = [f"{len(report.skipped)} record(s) could not be imported"] \
                if report.skipped else []
            raise CommandError("; ".join(failures + [p for p in problems if p]))

    def _import_file(self, source: str, options) -> importing.Report:
        if source.endswith(".csv"):
            raise CommandError("a CSV export cannot be imported (it loses types); export "
                               "JSON lines (the default) and import that")
        try:
            stream = sys.stdin.buffer if source == "-" else open(source, "rb")
        except OSError as exc:
            raise CommandError(f"cannot read {source}: {exc.strerror}") from None
        try:
            return importing.import_jsonl(
                stream, actor=cli_actor(), source="standard input" if source == "-" else source,
                batch_size=options["batch_size"], max_bytes=options["max_record_bytes"])
        except DatabaseError as exc:
            raise CommandError(f"the database refused a batch ({exc}); the batches before it "
                               f"are imported, and a re-run changes nothing in them") from None
        finally:
            if source != "-":
                stream.close()

    def do_stats(self, options):
        for label, field in (("status", "status"), ("kind", "kind"), ("task", "task_name")):
            self.stdout.write(f"by {label}:")
            rows = DeadLetter.objects.values(field).annotate(n=Count("pk")).order_by("-n", field)
            for row in rows[:50]:
                self.stdout.write(f"  {row['n']:>8}  {row[field]}")

    def do_drain(self, options):
        from celery import current_app

        pending = spool()
        if options.get("requeue_quarantined"):
            requeued = pending.requeue_quarantined()
            self.stdout.write(f"Requeued {requeued} quarantined record{'s' if requeued != 1 else ''}.")
        drained = drain_spool(backend=current_app.backend)
        self.stdout.write(f"Drained {drained} spooled letter{'s' if drained != 1 else ''} into the database.")
        quarantined = pending.quarantined()
        if quarantined:
            self.stdout.write(
                f"{quarantined} record{'s are' if quarantined != 1 else ' is'} quarantined in "
                f"{pending.directory} (*.bad, the reason in *.error beside each): the database "
                f"refused {'them' if quarantined != 1 else 'it'}. Fix the cause, then run "
                f"`manage.py dlq drain --requeue-quarantined`.")
