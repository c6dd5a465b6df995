"""The dead-letter admin: inspect, replay (with an edited payload), discard, resolve.

Every operation calls recovery.operations.replay, the same service as ``manage.py dlq``;
each is behind its own permission, bulk and destructive ones go through a
confirmation page, and each ends with one pluralised message.
"""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.utils.text import Truncator
from django.utils.timesince import timesince

from recovery import conf
from recovery.core import redaction
from recovery.operations import replay as service
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.workflows.sagas import saga_of_letter

from . import groups as failure_groups
from .changelist import ChangeListAtScale, TaskNameFilter
from .confirmation import ConfirmedOperationsMixin, Operation, Outcome
from .forms import ReplayForm
from .hostile import has_nul
from .lookups import SafeLookupsMixin
from .reveals import record_reveals, reveals_anything
from . import resilience_admin  # noqa: F401 - registers the circuits/degraded/fallback admin
from . import rehearsals_admin  # noqa: F401 - registers the rehearsals admin

_PARKED = (DeadLetter.Status.PARKED,)
#: what an operator may do to parked letters (what each does: DeadLetterAdmin.explain)
OPERATIONS = {
    "replay": Operation("replay_deadletter", "replayed", _PARKED),
    "discard": Operation("discard_deadletter", "discarded", _PARKED),
    "resolve": Operation("resolve_deadletter", "resolved", _PARKED),
    "compensate": Operation("compensate_deadletter", "compensated", _PARKED),
}


class DeadLetterEventInline(admin.TabularInline):
    """The audit trail: shown on each letter, never editable or deletable."""

    model = DeadLetterEvent
    fields = ("at", "action", "actor", "note_shown", "outcome_shown", "before_shown",
              "after_shown")
    readonly_fields = fields

    def _shown(self, event: DeadLetterEvent) -> redaction.ShownLetter:
        # One ShownLetter per letter for the page (the inline is built per request).
        cache = self.__dict__.setdefault("_shown_letters", {})
        if event.letter_id not in cache:
            cache[event.letter_id] = redaction.shown_letter(event.letter)
        return cache[event.letter_id]

    @admin.display(description="note")
    def note_shown(self, event: DeadLetterEvent) -> str:
        return self._shown(event).text(event.note)

    @admin.display(description="outcome")
    def outcome_shown(self, event: DeadLetterEvent) -> str:
        return self._shown(event).text(event.outcome)

    def _payload(self, event: DeadLetterEvent, payload) -> str:
        if not isinstance(payload, dict):
            return "—"
        return json.dumps(self._shown(event).payload(payload), default=str)

    @admin.display(description="payload before")
    def before_shown(self, event: DeadLetterEvent) -> str:
        return self._payload(event, event.before)

    @admin.display(description="payload after")
    def after_shown(self, event: DeadLetterEvent) -> str:
        return self._payload(event, event.after)
    extra = 0
    can_delete = False
    ordering = ("-at", "-pk")

    def has_view_permission(self, request, obj=None) -> bool:
        # Whoever may see a letter may see its history.
        return request.user.has_perm("recovery.view_deadletter")

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def _pre(text: str) -> str:
    return format_html("<pre>{}</pre>", redaction.clipped(text))


def _pretty(value) -> str:
    return _pre(json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False))


@admin.register(DeadLetter)
class DeadLetterAdmin(ConfirmedOperationsMixin, SafeLookupsMixin, ChangeListAtScale,
                      admin.ModelAdmin):
    # indexed change list: see .changelist; what it may be filtered by: see .lookups
    payload_fields = ("args", "kwargs", "headers", "raw_body", "traceback", "history", "events",
                      "exception_message")  # text stored before scrubbing may quote secrets
    # the failure group's "list them all" links; a rehearsal's page links to its letters
    filter_fields = ("fingerprint", "rehearsal")
    list_display = ("task_name", "status", "kind", "exception_type", "attempts", "replay_count",
                    "last_failed_at", "age")
    list_filter = ("status", "kind", TaskNameFilter, "last_failed_at")
    search_fields = ("=task_id", "task_name", "exception_message")
    date_hierarchy = "last_failed_at"
    actions = ("replay_selected", "discard_selected", "resolve_selected", "compensate_selected")
    inlines = (DeadLetterEventInline,)
    change_form_template = "admin/recovery/deadletter/change_form.html"
    change_list_template = "admin/recovery/deadletter/change_list.html"
    operations = OPERATIONS
    confirmation_noun = ("parked dead letter", "parked dead letters")
    confirmation_item = ("letter", "letters")
    show_full_result_count = False
    list_per_page = 50
    fieldsets = (
        (None, {"fields": ("task_id", "task_name", "status", "kind", "permanent", "reason",
                           "attempts", "replay_count", "queue", "worker",
                           "first_failed_at", "last_failed_at", "fingerprint", "rehearsal")}),
        ("Exception", {"fields": ("exception_type", "exception_message_shown", "traceback_pre")}),
        ("Payload", {"fields": ("args_pretty", "kwargs_pretty", "headers_pretty", "raw_body_shown",
                                "content_type")}),
        ("Attempt history", {"fields": ("history_table",)}),
        ("Same failure", {"fields": ("same_fingerprint",)}),
    )
    readonly_fields = tuple(
        f for section in fieldsets for f in section[1]["fields"]
    )

    @admin.display(description="age")
    def age(self, obj: DeadLetter) -> str:
        return timesince(obj.first_failed_at)

    # -- secrets: masked unless the user may reveal them and asked to ------------------

    def get_object(self, request, object_id, from_field=None):
        obj = super().get_object(request, object_id, from_field)
        if obj is not None:
            obj._can_reveal = request.user.has_perm("recovery.reveal_deadletter_secrets")
            obj._reveal = obj._can_reveal and request.GET.get("reveal") == "1"
        return obj

    @staticmethod
    def _shown(obj: DeadLetter) -> redaction.ShownLetter:
        """What this page shows of ``obj``: one redaction.shown_letter per request."""
        if getattr(obj, "_shown", None) is None:
            obj._shown = redaction.shown_letter(obj, reveal=getattr(obj, "_reveal", False))
        return obj._shown

    @admin.display(description="exception message")
    def exception_message_shown(self, obj: DeadLetter) -> str:
        return _pre(self._shown(obj).exception_message)

    @admin.display(description="traceback")
    def traceback_pre(self, obj: DeadLetter) -> str:
        return _pre(self._shown(obj).traceback)

    @admin.display(description="args")
    def args_pretty(self, obj: DeadLetter) -> str:
        return _pretty(self._shown(obj).args)

    @admin.display(description="kwargs")
    def kwargs_pretty(self, obj: DeadLetter) -> str:
        return _pretty(self._shown(obj).kwargs)

    @admin.display(description="headers")
    def headers_pretty(self, obj: DeadLetter) -> str:
        return _pretty(self._shown(obj).headers)

    @admin.display(description="raw body")
    def raw_body_shown(self, obj: DeadLetter) -> str:
        return _pre(self._shown(obj).raw_body)

    @admin.display(description="history")
    def history_table(self, obj: DeadLetter) -> str:
        history = self._shown(obj).history
        rows = "".join(
            format_html("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        e.get("attempt", ""), e.get("at", ""), e.get("kind", ""),
                        e.get("exception_type", ""),
                        redaction.clipped(str(e.get("exception_message", "")), 2000),
                        "—" if not isinstance(e.get("delay_seconds"), (int, float))
                        else f"{e['delay_seconds']:.2f}s")
            for e in history[:200] if isinstance(e, dict)
        )
        return format_html(
            "<table><thead><tr><th>#</th><th>at</th><th>kind</th><th>exception</th>"
            "<th>message</th><th>next delay</th></tr></thead><tbody>{}</tbody></table>",
            mark_safe(rows),  # each row was built by format_html above
        )

    @admin.display(description="other letters with this fingerprint")
    def same_fingerprint(self, obj: DeadLetter) -> str:
        counts, recent = failure_groups.siblings(obj)
        if not counts:
            return "None: this failure happened once."
        changelist = reverse("admin:recovery_deadletter_changelist")
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        rows = "".join(
            format_html('<li><a href="{}">{}</a> {} — {}, last failed {}</li>',
                        reverse("admin:recovery_deadletter_change", args=[other.pk]), other.pk,
                        other.status, other.task_id, other.last_failed_at.strftime("%Y-%m-%d %H:%M"))
            for other in recent
        )
        return format_html(
            '{} other letter{} ({}). <a href="{}?fingerprint={}">List them all</a> · '
            '<a href="{}">act on the group</a><ul>{}</ul>',
            sum(counts.values()), "" if sum(counts.values()) == 1 else "s", summary,
            changelist, obj.fingerprint,
            reverse("admin:recovery_deadletter_group", args=[obj.fingerprint]),
            mark_safe(rows),  # each row was built by format_html above
        )

    # -- permissions ------------------------------------------------------------------

    def has_replay_permission(self, request) -> bool:
        return self.has_operation_permission(request, "replay")

    def has_discard_permission(self, request) -> bool:
        return self.has_operation_permission(request, "discard")

    def has_resolve_permission(self, request) -> bool:
        return self.has_operation_permission(request, "resolve")

    def has_compensate_permission(self, request) -> bool:
        return self.has_operation_permission(request, "compensate")

    # -- bulk actions (the confirmation flow: .confirmation) -----------------------------

    @admin.action(permissions=["replay"], description="Replay selected dead letters")
    def replay_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "replay")

    @admin.action(permissions=["discard"], description="Discard selected dead letters")
    def discard_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "discard")

    @admin.action(permissions=["resolve"], description="Mark selected dead letters resolved")
    def resolve_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "resolve")

    @admin.action(permissions=["compensate"], description="Compensate selected dead letters")
    def compensate_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "compensate")

    def get_bulk_max(self, request) -> int:
        return conf.get("ADMIN_BULK_MAX")

    def refuse_bulk(self, request, operation: str, count: int) -> bool:
        return self._too_many(request, count, operation, "--ids …")

    def perform(self, request, operation: str, letters, note: str) -> Outcome:
        result = service.bulk(operation, letters, actor=request.user.get_username(), note=note)
        return Outcome(result.done, result.failed, result.errors[0] if result.errors else "")

    def act_on_one(self, request, operation: str, letter: DeadLetter, note: str) -> None:
        """One letter goes through its own service call: a letter that cannot be acted on
        says why (the bulk call would skip it)."""
        try:
            getattr(service, operation)(letter, actor=request.user.get_username(), note=note)
        except service.ReplayError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self.message_user(request, f"Dead letter {letter.pk} was {OPERATIONS[operation].past}.",
                              messages.SUCCESS)

    def confirmation_summary(self, letter: DeadLetter) -> str:
        message = redaction.shown_letter(letter).exception_message
        return f"{letter.task_name} — {letter.exception_type}: {Truncator(message).chars(120)}"

    def _too_many(self, request, count: int, operation: str, selector: str) -> bool:
        """Web requests handle up to ``RECOVERY["ADMIN_BULK_MAX"]`` letters; more belong to
        ``manage.py dlq``, which streams, rate-limits and survives a closed browser tab."""
        limit = conf.get("ADMIN_BULK_MAX")
        if count <= limit:
            return False
        self.message_user(
            request,
            f"{count} letters are more than the admin handles in one request ({limit}). "
            f"Run it from a shell instead, where it is streamed and resumable: "
            f"python manage.py dlq {operation} {selector}"
            f"{' --rate 200' if operation == 'replay' else ''}",  # only replay takes --rate
            messages.ERROR,
        )
        return True

    def explain(self, operation: str, letters) -> str:
        if operation == "replay":
            return ("Each letter is republished under its own task id with a fresh attempt "
                    "budget; it is resolved when the replayed run succeeds and parked again "
                    "if it fails for good.")
        if operation == "compensate":
            names = list(letters.order_by().values_list("task_name", flat=True).distinct()[:20])
            undo = []
            for name in names:
                try:
                    undo.append(f"{name} → {service.compensation_name(name) or 'no compensation declared'}")
                except service.ReplayError as exc:
                    undo.append(f"{name} → {exc}")
            saga_note = (" A saga step's letter compensates its saga run instead (its completed "
                         "steps undone in reverse order)."
                         if letters.filter(headers__headers__has_key="recovery_saga").exists()
                         else "")
            return ("Runs each letter's compensation with the letter's payload and marks the "
                    "letter compensated: " + "; ".join(undo) + "." + saga_note)
        if operation == "discard":
            return "The letters stay on record as discarded; nothing is run."
        return "The letters are marked resolved (the work was done some other way); nothing is run."

    # -- extra views: failure groups, one letter's replay form and operations -------------

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("groups/", wrap(self.groups_view), name="recovery_deadletter_groups"),
            path("groups/<str:fingerprint>/", wrap(self.group_view),
                 name="recovery_deadletter_group"),
            path("<int:object_id>/replay/", wrap(self.replay_view),
                 name="recovery_deadletter_replay"),
            *self.operation_urls("discard", "resolve", "compensate"),
            *super().get_urls(),
        ]

    # -- failure groups ---------------------------------------------------------------------

    def groups_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        status = request.GET.get("status", DeadLetter.Status.PARKED)
        if status not in DeadLetter.Status.values and status != "all":
            status = DeadLetter.Status.PARKED
        context = {
            **self.admin_site.each_context(request),
            "title": "Failure groups",
            "groups": failure_groups.groups(None if status == "all" else status),
            "status": status,
            "statuses": [("all", "All statuses"), *DeadLetter.Status.choices],
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/recovery/deadletter/groups.html", context)

    def group_view(self, request, fingerprint):
        """One group: what it is, and (POST) replay / discard / resolve / compensate it all."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        longest = DeadLetter._meta.get_field("fingerprint").max_length
        if has_nul(fingerprint) or len(fingerprint) > longest:  # no letter has it; PostgreSQL
            raise Http404("no dead letters have this fingerprint")  # would refuse a NUL
        letters = failure_groups.group_letters(fingerprint)
        parked = letters.filter(status=DeadLetter.Status.PARKED)
        operation = request.POST.get("operation") or request.GET.get("operation")
        if operation is not None:
            if operation not in OPERATIONS:
                raise Http404(f"unknown operation {operation!r}")
            if not self.has_operation_permission(request, operation):
                raise PermissionDenied
        if request.method == "POST":
            if operation is None or request.POST.get("post") != "yes":
                raise Http404("a group operation is posted from its confirmation page")
            count = parked.count()
            if not self._too_many(request, count, operation, f"--fingerprint {fingerprint}"):
                self.run_operation(request, operation, parked)
            return HttpResponseRedirect(
                reverse("admin:recovery_deadletter_group", args=[fingerprint]))
        total = letters.count()
        if total == 0:
            raise Http404("no dead letters have this fingerprint")
        count = parked.count()
        sample = letters.order_by("-last_failed_at").first()
        sample.shown = redaction.shown_letter(sample)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Failure group {fingerprint[:12]}",
            "fingerprint": fingerprint,
            "sample": sample,
            "total": total,
            "count": count,
            "by_status": sorted(letters.order_by().values_list("status").annotate(n=Count("pk"))),
            "letters": parked.order_by("pk")[:200],
            "operation": operation,
            "explanation": self.explain(operation, parked) if operation else "",
            "operations": [op for op in OPERATIONS if self.has_operation_permission(request, op)
                           and (op != "compensate" or self._compensation(sample) is not None)],
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/recovery/deadletter/group.html", context)

    def _letter_or_404(self, request, object_id) -> DeadLetter:
        if not self.has_view_permission(request):
            raise PermissionDenied
        letter = self.object_or_none(request, str(object_id))
        if letter is None:
            raise Http404(f"no dead letter {object_id}")
        return letter

    def replay_view(self, request, object_id):
        letter = self._letter_or_404(request, object_id)
        if not self.has_replay_permission(request):
            raise PermissionDenied
        can_reveal = request.user.has_perm("recovery.reveal_deadletter_secrets")
        form = ReplayForm(request.POST or None, letter=letter, can_reveal=can_reveal)
        if request.method == "GET" and form.reveals:
            record_reveals([letter.pk], actor=request.user.get_username(), via="admin replay form")
        if request.method == "POST" and form.is_valid():
            if form.edited and not request.user.has_perm("recovery.change_deadletter"):
                raise PermissionDenied
            edit = form.edited
            try:
                service.replay(
                    letter, actor=request.user.get_username(), queue=form.cleaned_data["queue"] or None,
                    args=form.cleaned_data["args"] if edit else None,
                    kwargs=form.cleaned_data["kwargs"] if edit else None,
                    note=form.cleaned_data["note"],
                    rerun_effects=form.cleaned_data["rerun_effects"],
                )
            except service.ReplayError as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(request, f"Dead letter {letter.pk} was replayed"
                                           f"{' with the edited payload' if edit else ''}"
                                           f"{', its effects to run again' if form.cleaned_data['rerun_effects'] else ''}.",
                                  messages.SUCCESS)
                return HttpResponseRedirect(
                    reverse("admin:recovery_deadletter_change", args=[letter.pk]))
        context = {
            **self.admin_site.each_context(request),
            "title": f"Replay {letter.task_name}",
            "letter": letter,
            "form": form,
            "opts": self.model._meta,
            "can_edit": request.user.has_perm("recovery.change_deadletter"),
        }
        return TemplateResponse(request, "admin/recovery/deadletter/replay_form.html", context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        letter = self.object_or_none(request, object_id)
        parked = letter is not None and letter.status == DeadLetter.Status.PARKED
        extra_context = {
            **(extra_context or {}),
            "can_replay": parked and self.has_replay_permission(request),
            "can_reveal": (letter is not None and request.GET.get("reveal") != "1"
                           and request.user.has_perm("recovery.reveal_deadletter_secrets")
                           and (redaction.has_secrets(letter.task_name, letter.args, letter.kwargs)
                                or bool(redaction.shown_letter(letter).hidden))),
            "can_discard": parked and self.has_discard_permission(request),
            "can_resolve": parked and self.has_resolve_permission(request),
            "can_compensate": parked and self.has_compensate_permission(request)
                              and self._compensation(letter) is not None,
        }
        response = super().change_view(request, object_id, form_url, extra_context)
        if (letter is not None and response.status_code == 200 and request.GET.get("reveal") == "1"
                and self.may_reveal(request) and reveals_anything(letter)):
            record_reveals([letter.pk], actor=request.user.get_username(), via="admin change page")
        return response

    @staticmethod
    def _compensation(letter: DeadLetter) -> str | None:
        if saga_of_letter(letter) is not None:
            return "the saga run's compensations"
        try:
            return service.compensation_name(letter.task_name)
        except service.ReplayError:
            return None

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
