"""The incident admin: what escalation opened, with its diagnostics, letters, saga run and
notifications; acknowledge and resolve, each behind its own permission.

Read-only otherwise: an incident changes only through ``recovery.observe.escalation.acknowledge``
and ``recovery.observe.escalation.resolve`` (resolving tells the webhook that was told of the
opening). The change list shows open incidents first, the most recently seen on top. The
bulk actions go through a confirmation page; the buttons on an incident's page act at
once (with an optional note); both end with one pluralised message. Without
``recovery.acknowledge_incident`` / ``recovery.resolve_incident`` there is no button, no
action, and the URL answers 403. Only a superuser may delete an incident.

Registered by importing this module from ``DlqAdminConfig.ready``.
"""

from __future__ import annotations

import json

from django.contrib import admin
from django.db.models import Case, IntegerField, Value, When
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from recovery.observe import escalation
from recovery.models import Incident, IncidentNotification

from .confirmation import ConfirmedOperationsMixin, Operation, Outcome
from .lookups import SafeLookupsMixin

#: Incidents one bulk action acts on; more are left for the next run of the action.
BULK_MAX = 500

OPERATIONS = {
    "acknowledge": Operation(
        "acknowledge_incident", "acknowledged", (Incident.Status.OPEN,),
        "Tells the other operators that someone is on it. The incident stays open: new "
        "letters of the same failure keep adding to it and notify nobody again.",
    ),
    "resolve": Operation(
        "resolve_incident", "resolved", (Incident.Status.OPEN, Incident.Status.ACKNOWLEDGED),
        "Closes the incident; the next letter of the same failure opens a new one and "
        "notifies again. A webhook that was told of the opening is told of the resolution "
        "(a ticket bridge closes its ticket).",
        state="open or acknowledged",
    ),
}

#: keys of ``Incident.details`` shown in their own fields; the rest under "other details"
SHOWN_DETAILS = {"exception", "traceback", "args", "kwargs", "history", "links",
                 "classification"}


def _json(value) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, default=str,
                                                   ensure_ascii=False))


def _safe_url(url) -> bool:
    return isinstance(url, str) and url.startswith(("/", "http://", "https://"))


class IncidentNotificationInline(admin.TabularInline):
    """Each message to a channel about the incident, and how its delivery went."""

    model = IncidentNotification
    fields = ("channel", "event", "status", "attempts", "last_error", "sent_at",
              "next_attempt_at", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("created_at", "id")

    def has_view_permission(self, request, obj=None) -> bool:
        # Whoever may see an incident may see whom it was sent to.
        return request.user.has_perm("recovery.view_incident")

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Incident)
class IncidentAdmin(ConfirmedOperationsMixin, SafeLookupsMixin, admin.ModelAdmin):
    payload_fields = ("details", "letters", "notifications")
    list_display = ("status", "severity", "reason", "title", "task_name", "count",
                    "first_seen_at", "last_seen_at")
    list_display_links = ("title",)
    list_filter = ("status", "severity", "reason")
    search_fields = ("title", "task_name", "^fingerprint")
    actions = ("acknowledge_selected", "resolve_selected")
    inlines = (IncidentNotificationInline,)
    change_form_template = "admin/recovery/incident/change_form.html"
    operations = OPERATIONS
    confirmation_note_label = "Note (optional, kept on the incident):"
    list_per_page = 50
    fieldsets = (
        (None, {"fields": ("title", "status", "severity", "reason", "count", "task_name", "kind",
                           "queue", "fingerprint", "first_seen_at", "last_seen_at")}),
        ("Diagnostics of the latest occurrence", {"fields": (
            "exception_shown", "classification_shown", "traceback_pre", "args_pretty",
            "kwargs_pretty", "history_table", "links_shown", "other_details")}),
        ("Letters and saga run", {"fields": ("letters_shown", "saga_run_shown")}),
        ("Handling", {"fields": ("acknowledged_at", "acknowledged_by", "resolved_at",
                                 "resolved_by", "note")}),
    )
    readonly_fields = tuple(f for section in fieldsets for f in section[1]["fields"])

    def get_ordering(self, request):
        # Open first, then acknowledged, then resolved; the most recently seen first in each.
        waiting = Case(When(status=Incident.Status.OPEN, then=Value(0)),
                       When(status=Incident.Status.ACKNOWLEDGED, then=Value(1)),
                       default=Value(2), output_field=IntegerField())
        return (waiting.asc(), "-last_seen_at", "-id")

    # -- diagnostics (``details`` is stored with secrets masked) -----------------------------

    @staticmethod
    def _details(obj: Incident) -> dict:
        return obj.details if isinstance(obj.details, dict) else {}

    @admin.display(description="exception")
    def exception_shown(self, obj: Incident) -> str:
        exc = self._details(obj).get("exception") or {}
        if not isinstance(exc, dict) or not (exc.get("type") or exc.get("message")):
            return "—"
        return format_html("<strong>{}</strong>: {}", exc.get("type", ""), exc.get("message", ""))

    @admin.display(description="classification")
    def classification_shown(self, obj: Incident) -> str:
        found = self._details(obj).get("classification") or {}
        if not isinstance(found, dict) or not found:
            return "—"
        return format_html("{} ({}){}", found.get("kind", "?"),
                           "permanent" if found.get("permanent") else "transient",
                           f": {found['reason']}" if found.get("reason") else "")

    @admin.display(description="traceback")
    def traceback_pre(self, obj: Incident) -> str:
        text = self._details(obj).get("traceback")
        return format_html("<pre>{}</pre>", text) if text else "—"

    @admin.display(description="args (masked)")
    def args_pretty(self, obj: Incident) -> str:
        details = self._details(obj)
        return _json(details["args"]) if "args" in details else "—"

    @admin.display(description="kwargs (masked)")
    def kwargs_pretty(self, obj: Incident) -> str:
        details = self._details(obj)
        return _json(details["kwargs"]) if "kwargs" in details else "—"

    @admin.display(description="attempt history")
    def history_table(self, obj: Incident) -> str:
        entries = [e for e in self._details(obj).get("history") or [] if isinstance(e, dict)]
        if not entries:
            return "—"
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((e.get("attempt", ""), e.get("at", ""), e.get("kind", ""), e.get("exception_type", ""),
              e.get("exception_message", ""),
              "—" if e.get("delay_seconds") is None else e["delay_seconds"]) for e in entries))
        return format_html(
            "<table><thead><tr><th>#</th><th>at</th><th>kind</th><th>exception</th>"
            "<th>message</th><th>next delay (s)</th></tr></thead><tbody>{}</tbody></table>", rows)

    @admin.display(description="links")
    def links_shown(self, obj: Incident) -> str:
        links = self._details(obj).get("links") or {}
        shown = [(url, name) for name, url in sorted(links.items()) if _safe_url(url)] \
            if isinstance(links, dict) else []
        if not shown:
            return "—"
        return format_html_join(" · ", '<a href="{}">{}</a>', shown)

    @admin.display(description="other details")
    def other_details(self, obj: Incident) -> str:
        rest = {k: v for k, v in self._details(obj).items() if k not in SHOWN_DETAILS}
        return _json(rest) if rest else "—"

    # -- letters and saga run ----------------------------------------------------------------

    @admin.display(description="dead letters")
    def letters_shown(self, obj: Incident) -> str:
        total = obj.letters.count()
        if not total:
            return "None linked."
        changelist = reverse("admin:recovery_deadletter_changelist")
        recent = obj.letters.order_by("-last_failed_at", "-id")[:20]
        rows = format_html_join(
            "", '<li><a href="{}">{}</a> {} {} — {}, last failed {}</li>',
            ((reverse("admin:recovery_deadletter_change", args=[letter.pk]), letter.pk,
              letter.task_name, letter.task_id, letter.status,
              letter.last_failed_at.strftime("%Y-%m-%d %H:%M")) for letter in recent))
        # The letters' own fingerprints (a watchdog incident has one of its own).
        fingerprints = sorted(set(obj.letters.order_by().values_list("fingerprint", flat=True)
                                  .distinct()[:5]))
        groups = format_html_join(
            " · ", '<a href="{}?fingerprint={}">all letters with fingerprint {}</a> '
                   '(<a href="{}">failure group</a>)',
            ((changelist, fp, fp[:12], reverse("admin:recovery_deadletter_group", args=[fp]))
             for fp in fingerprints))
        return format_html(
            "{} letter{} linked{}. {}<ul>{}</ul>",
            total, "" if total == 1 else "s", " (the 20 latest below)" if total > 20 else "",
            groups, rows)

    @admin.display(description="saga run")
    def saga_run_shown(self, obj: Incident) -> str:
        run = obj.saga_run
        if run is None:
            return "—"
        return format_html('<a href="{}">{} #{}</a> — {}',
                           reverse("admin:recovery_sagarun_change", args=[run.pk]), run.name,
                           run.pk, run.get_status_display())

    # -- permissions --------------------------------------------------------------------------

    def has_acknowledge_permission(self, request) -> bool:
        return self.has_operation_permission(request, "acknowledge")

    def has_resolve_permission(self, request) -> bool:
        return self.has_operation_permission(request, "resolve")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return request.user.is_active and request.user.is_superuser

    # -- acknowledge and resolve (the flow: .confirmation) -----------------------------------

    def get_urls(self):
        return [*self.operation_urls("acknowledge", "resolve"), *super().get_urls()]

    def get_bulk_max(self, request) -> int:
        return BULK_MAX  # read at call time: a test lowers it

    def perform(self, request, operation: str, incidents, note: str) -> Outcome:
        """Acknowledge or resolve each incident still in a status the operation applies to
        (resolving one twice would tell its webhook twice)."""
        done = 0
        for incident in incidents:
            if incident.status not in OPERATIONS[operation].statuses:
                continue
            try:
                after = getattr(escalation, operation)(
                    incident, actor=request.user.get_username(), note=note)
            except Incident.DoesNotExist:  # deleted meanwhile
                continue
            done += after.status != incident.status
        return Outcome(done)

    def confirmation_summary(self, incident: Incident) -> str:
        return (f"{incident.get_severity_display()} — {Truncator(incident.title).chars(160)} "
                f"({incident.get_status_display().lower()}, {incident.count} "
                f"occurrence{pluralize(incident.count)})")

    @admin.action(permissions=["acknowledge"], description="Acknowledge selected incidents")
    def acknowledge_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "acknowledge")

    @admin.action(permissions=["resolve"], description="Resolve selected incidents")
    def resolve_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "resolve")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        incident = (Incident.objects.filter(pk=object_id).only("status").first()
                    if str(object_id).isdigit() else None)
        status = incident.status if incident is not None else None
        extra_context = {
            **(extra_context or {}),
            "can_acknowledge": (status in OPERATIONS["acknowledge"].statuses
                                and self.has_acknowledge_permission(request)),
            "can_resolve": (status in OPERATIONS["resolve"].statuses
                            and self.has_resolve_permission(request)),
        }
        return super().change_view(request, object_id, form_url, extra_context)
