"""``manage.py degraded``: switch degraded modes (e.g. read-only) that every worker sees.

    manage.py degraded [list]                  every known mode, on or off, who and why
    manage.py degraded on MODE --reason TEXT   tasks declaring degraded_mode=MODE defer,
                                               use their fallback, or run (when_degraded)
    manage.py degraded off MODE [--reason TEXT]

Code can check a mode with recovery.workflows.degraded.is_on("read-only"). The same switches are on
the admin page /admin/recovery/sharedstate/. See docs/fallbacks.md.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from dlq_admin.management.actor import cli_actor
from dlq_admin.resilience import NAME, mode_rows
from recovery.workflows import degraded


class Command(BaseCommand):
    help = "List and switch degraded modes (see the module docstring)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="verb")
        sub.add_parser("list", help="every known mode and its switch")
        on = sub.add_parser("on", help="switch a mode on")
        on.add_argument("mode")
        on.add_argument("--reason", required=True, help="why, for the other operators")
        off = sub.add_parser("off", help="switch a mode off")
        off.add_argument("mode")
        off.add_argument("--reason", default="")

    def handle(self, *args, **options):
        verb = options.get("verb") or "list"
        if verb == "list":
            return self.do_list()
        mode = options["mode"]
        if not NAME.match(mode):
            raise CommandError(f"{mode!r} is not a mode name (letters, digits, . _ : -)")
        try:
            degraded.switch(mode, verb == "on", actor=cli_actor(), reason=options["reason"])
        except Exception as exc:  # noqa: BLE001
            raise CommandError(f"the shared state cannot be reached; {mode} unchanged: "
                               f"{exc}") from None
        self.stdout.write(f"Degraded mode {mode} is {verb}.")

    def do_list(self):
        rows, error = mode_rows()
        if error:
            raise CommandError(f"the shared state cannot be read: {error}")
        if not rows:
            self.stdout.write("No degraded modes: none switched and no task declares "
                              "degraded_mode=.")
            return
        self.stdout.write(f"{'mode':<24} {'state':<5}  {'since':<20} {'by':<16} reason")
        for row in rows:
            self.stdout.write(f"{row.name:<24} {'on' if row.on else 'off':<5}  "
                              f"{_when(row):<20} {(row.actor or '-'):<16} "
                              f"{row.reason or ''}")


def _when(row) -> str:
    return row.since_at.strftime("%Y-%m-%d %H:%M:%SZ") if row.since_at else (row.since or "-")
