"""``manage.py incidents``: the on-call's incidents from a shell.

    manage.py incidents [list] [--all] [--status S] [--limit N] [--json]
    manage.py incidents show ID [--json]       diagnostics, letters, notifications
    manage.py incidents ack ID [--note TEXT]   someone is on it (still deduplicates)
    manage.py incidents resolve ID [--note TEXT]
                                               closed; the webhook hears of it; the next
                                               occurrence opens a new incident
    manage.py incidents deliver                send due notifications now (workers do it
                                               every few seconds)
    manage.py incidents redeliver [ID ...]     try given-up notifications again (of these
                                               incidents, or of all still open), then deliver

Acknowledge and resolve go through recovery.observe.escalation, the same service as the admin
(actor cli:<user>). Exit status 1 when the incident does not exist.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.timesince import timesince

from dlq_admin.management.actor import cli_actor
from recovery.observe import escalation, notify
from recovery.models import Incident, IncidentNotification


def _ago(moment) -> str:
    return f"{timesince(moment, timezone.now())} ago" if moment else "-"


class Command(BaseCommand):
    help = "List, show, acknowledge and resolve incidents (see the module docstring)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="verb")
        listing = sub.add_parser("list", help="open and acknowledged incidents, latest first")
        listing.add_argument("--all", action="store_true", help="resolved ones too")
        listing.add_argument("--status", choices=Incident.Status.values)
        listing.add_argument("--limit", type=int, default=50)
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        show = sub.add_parser("show", help="one incident, whole")
        show.add_argument("id", type=int)
        show.add_argument("--json", action="store_true")
        for verb, text in (("ack", "acknowledge: someone is on it"),
                           ("resolve", "close it; the next occurrence opens a new one")):
            p = sub.add_parser(verb, help=text)
            p.add_argument("id", type=int)
            p.add_argument("--note", default="", help="recorded on the incident")
        sub.add_parser("deliver", help="send due notifications now")
        redeliver = sub.add_parser("redeliver", help="try given-up notifications again")
        redeliver.add_argument("ids", type=int, nargs="*", help="incident ids (default: every incident still open)")

    def handle(self, *args, **options):
        verb = options.get("verb") or "list"
        if verb == "list" and "limit" not in options:
            options.update({"all": False, "status": None, "limit": 50, "json": False})
        return getattr(self, f"do_{verb}")(options)

    @staticmethod
    def _get(pk: int) -> Incident:
        try:
            return Incident.objects.get(pk=pk)
        except Incident.DoesNotExist:
            raise CommandError(f"incident {pk} does not exist") from None

    def do_list(self, options):
        incidents = Incident.objects.order_by("-last_seen_at", "-id")
        if options.get("status"):
            incidents = incidents.filter(status=options["status"])
        elif not options.get("all"):
            incidents = incidents.exclude(status=Incident.Status.RESOLVED)
        incidents = list(incidents[: options.get("limit") or 50])
        if options.get("json"):
            self.stdout.write(json.dumps([_summary(i) for i in incidents], default=str, indent=2))
            return
        if not incidents:
            self.stdout.write("No open incidents." if not options.get("all") else "No incidents.")
            return
        self.stdout.write(f"{'id':>5}  {'status':<12} {'severity':<8} {'count':>5}  "
                          f"{'last seen':<16} title")
        for incident in incidents:
            self.stdout.write(f"{incident.pk:>5}  {incident.status:<12} {incident.severity:<8} "
                              f"{incident.count:>5}  {_ago(incident.last_seen_at):<16} "
                              f"{incident.title}")

    def do_show(self, options):
        incident = self._get(options["id"])
        data = {**_summary(incident), "details": incident.details, "note": incident.note,
                "letters": list(incident.letters.order_by("-id").values_list("task_id", flat=True)[:50]),
                "notifications": [
                    {"channel": n.channel, "event": n.event, "status": n.status,
                     "attempts": n.attempts, "last_error": n.last_error, "sent_at": n.sent_at}
                    for n in incident.notifications.order_by("id")]}
        if options.get("json"):
            self.stdout.write(json.dumps(data, default=str, indent=2))
            return
        for key in ("id", "title", "status", "severity", "reason", "task", "queue", "count",
                    "first_seen_at", "last_seen_at", "acknowledged_by", "resolved_by", "url"):
            self.stdout.write(f"{key + ':':<17}{data[key] if data[key] not in (None, '') else '-'}")
        if incident.note:
            self.stdout.write(f"note:            {incident.note}")
        self.stdout.write("\nletters (newest 50): " + (", ".join(data["letters"]) or "-"))
        self.stdout.write("\nnotifications:")
        for n in data["notifications"]:
            self.stdout.write(f"  {n['channel']:<8} {n['event']:<9} {n['status']:<8} "
                              f"attempts={n['attempts']} {n['last_error']}")
        self.stdout.write("\ndiagnostics:")
        self.stdout.write(json.dumps(incident.details, default=str, indent=2))

    def do_ack(self, options):
        incident = escalation.acknowledge(self._get(options["id"]), actor=cli_actor(),
                                          note=options["note"])
        self.stdout.write(f"incident {incident.pk}: {incident.status}")

    def do_resolve(self, options):
        incident = escalation.resolve(self._get(options["id"]), actor=cli_actor(),
                                      note=options["note"])
        self.stdout.write(f"incident {incident.pk}: {incident.status}")

    def do_deliver(self, options):
        sent = notify.deliver_due(limit=1000)
        self.stdout.write(f"{sent} notification(s) sent")

    def do_redeliver(self, options):
        failed = IncidentNotification.objects.filter(status=IncidentNotification.Status.FAILED)
        if options["ids"]:
            for pk in options["ids"]:
                self._get(pk)
            failed = failed.filter(incident_id__in=options["ids"])
        else:
            failed = failed.filter(incident__status__in=escalation.OPEN_STATUSES)
        again = failed.update(status=IncidentNotification.Status.PENDING, attempts=0,
                              next_attempt_at=timezone.now())
        self.stdout.write(f"{again} given-up notification(s) pending again")
        self.do_deliver(options)


def _summary(incident: Incident) -> dict:
    return {
        "id": incident.pk, "title": incident.title, "status": incident.status,
        "severity": incident.severity, "reason": incident.reason, "task": incident.task_name,
        "queue": incident.queue, "fingerprint": incident.fingerprint, "count": incident.count,
        "first_seen_at": incident.first_seen_at, "last_seen_at": incident.last_seen_at,
        "acknowledged_by": incident.acknowledged_by, "resolved_by": incident.resolved_by,
        "saga_run": incident.saga_run_id, "url": escalation.incident_link(incident.pk),
    }
