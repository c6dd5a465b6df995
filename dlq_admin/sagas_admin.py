"""The saga-run admin: each run with its steps, timings and errors; resume from the failed
step and compensate, each behind its own permission and a confirmation page.

Read-only otherwise: runs change only through recovery.workflows.sagas (the same service as
``manage.py saga``), which locks the run and writes a ``SagaEvent``.
"""

from __future__ import annotations

import json

from django.contrib import admin
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator
from django.utils.timesince import timesince

from recovery.workflows import saga_secrets, sagas
from recovery.models import SagaEvent, SagaRun, SagaStep

from .confirmation import ConfirmedOperationsMixin, Operation, Outcome
from .lookups import SafeLookupsMixin
from .reveals import record_saga_reveal

OPERATIONS = {
    "resume": Operation(
        "resume_sagarun", "resumed", (SagaRun.Status.HELD, SagaRun.Status.FAILED),
        "The failed step is dispatched again under a new task id, with a fresh attempt "
        "budget and the run's current context; the steps before it are not run again. Its "
        "old dead letter is closed as resolved. Fix the cause first.",
    ),
    "compensate": Operation(
        "compensate_sagarun", "compensated",
        (SagaRun.Status.HELD, SagaRun.Status.NEEDS_HUMAN, SagaRun.Status.SUCCEEDED),
        "The completed steps are undone in reverse order, each by its compensation. On a "
        "run that needs a human, the compensation that failed is dispatched again first "
        "(fix its cause before). This cannot be taken back.",
    ),
}


class _ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("recovery.view_sagarun")

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class SagaStepInline(_ReadOnlyInline):
    model = SagaStep
    fields = ("index", "role", "task_name", "status", "task_id", "dispatches", "attempts",
              "dispatched", "started", "finished", "took", "error_shown", "result_shown")
    readonly_fields = fields
    #: Set per request by SagaRunAdmin.get_inline_instances (inlines are built per request).
    run: SagaRun | None = None
    ordering = ("index", "-role")

    @staticmethod
    def _moment(value) -> str:
        if not value:
            return "—"
        return format_html('<span class="nowrap">{}</span>',
                           timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S"))

    @admin.display(description="dispatched")
    def dispatched(self, row: SagaStep) -> str:
        return self._moment(row.dispatched_at)

    @admin.display(description="started")
    def started(self, row: SagaStep) -> str:
        return self._moment(row.started_at)

    @admin.display(description="finished")
    def finished(self, row: SagaStep) -> str:
        return self._moment(row.finished_at)

    @admin.display(description="took")
    def took(self, row: SagaStep) -> str:
        if not row.started_at:
            return "—"
        end = row.finished_at or timezone.now()
        return f"{(end - row.started_at).total_seconds():.2f}s"

    @admin.display(description="error")
    def error_shown(self, row: SagaStep) -> str:
        return _shown_error(self.run, row.error)

    @admin.display(description="result")
    def result_shown(self, row: SagaStep) -> str:
        if row.result is None:
            return "—"
        return json.dumps(_shown(self.run, row.result), default=str, ensure_ascii=False)[:300]


# -- secrets: masked unless the user may reveal them and asked to (as for dead letters) --

def _revealed(run: SagaRun | None) -> bool:
    return bool(getattr(run, "_reveal", False))


def _shown(run: SagaRun | None, value):
    """A context or a step's result as this request may see it."""
    if run is None:
        return saga_secrets.masked({}, value)
    return value if _revealed(run) else saga_secrets.masked(run, value)


def _shown_error(run: SagaRun | None, text: str) -> str:
    """An error as this request may see it (errors stored before they were scrubbed too)."""
    if _revealed(run) or not text:
        return text
    values = getattr(run, "_hidden", None)
    if values is None and run is not None:
        values = run._hidden = saga_secrets.hidden(
            run, run.steps.exclude(result=None).values_list("result", flat=True))
    return saga_secrets.scrub(text, values or [])


class SagaEventInline(_ReadOnlyInline):
    model = SagaEvent
    fields = ("at", "action", "actor", "note", "outcome")
    readonly_fields = fields


class WaitingFilter(admin.SimpleListFilter):
    """The runs an operator must act on."""

    title = "needs an operator"
    parameter_name = "waiting"

    def lookups(self, request, model_admin):
        return (("needs_human", "Needs a human (a compensation failed)"),
                ("any", "Held or needs a human"))

    def queryset(self, request, queryset):
        if self.value() == "needs_human":
            return queryset.filter(status=SagaRun.Status.NEEDS_HUMAN)
        if self.value() == "any":
            return queryset.filter(status__in=(SagaRun.Status.HELD, SagaRun.Status.NEEDS_HUMAN))
        return queryset


@admin.register(SagaRun)
class SagaRunAdmin(ConfirmedOperationsMixin, SafeLookupsMixin, admin.ModelAdmin):
    payload_fields = ("context", "error", "definition", "steps", "events")
    list_display = ("id", "name", "status", "step_shown", "version", "age", "updated_at")
    list_filter = ("status", WaitingFilter, "name")
    search_fields = ("=id", "=idempotency_key", "name")
    actions = ("resume_selected", "compensate_selected")
    inlines = (SagaStepInline, SagaEventInline)
    change_form_template = "admin/recovery/sagarun/change_form.html"
    operations = OPERATIONS
    confirmation_item = ("run", "runs")
    list_per_page = 50
    fields = ("name", "version", "status", "step_shown", "error_shown", "idempotency_key",
              "created_at", "updated_at", "finished_at", "context_pretty", "definition_pretty")
    readonly_fields = fields

    @admin.display(description="age")
    def age(self, run: SagaRun) -> str:
        return timesince(run.created_at)

    @admin.display(description="current step")
    def step_shown(self, run: SagaRun) -> str:
        if run.current_step is None:
            return "—"
        steps = (run.definition or {}).get("steps") or []
        task = steps[run.current_step]["task"] if run.current_step < len(steps) else "?"
        return f"{run.current_step}: {task.rsplit('.', 1)[-1]}"

    @admin.display(description="error")
    def error_shown(self, run: SagaRun) -> str:
        return _shown_error(run, run.error)

    @admin.display(description="context")
    def context_pretty(self, run: SagaRun) -> str:
        return format_html("<pre>{}</pre>", json.dumps(_shown(run, run.context), indent=2,
                                                       sort_keys=True, default=str,
                                                       ensure_ascii=False))

    # -- secrets --------------------------------------------------------------------------

    def get_object(self, request, object_id, from_field=None):
        run = super().get_object(request, object_id, from_field)
        if run is not None:
            run._reveal = (request.GET.get("reveal") == "1"
                           and request.user.has_perm("recovery.reveal_deadletter_secrets"))
        return run

    def get_inline_instances(self, request, obj=None):
        inlines = super().get_inline_instances(request, obj)
        for inline in inlines:
            inline.run = obj
        return inlines

    @admin.display(description="definition (as started)")
    def definition_pretty(self, run: SagaRun) -> str:
        return format_html("<pre>{}</pre>", json.dumps(run.definition, indent=2, default=str))

    # -- permissions ----------------------------------------------------------------------

    def has_resume_permission(self, request) -> bool:
        return self.has_operation_permission(request, "resume")

    def has_compensate_permission(self, request) -> bool:
        return self.has_operation_permission(request, "compensate")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    # -- operations (the flow: .confirmation) ---------------------------------------------

    def get_urls(self):
        return [*self.operation_urls("resume", "compensate"), *super().get_urls()]

    def perform(self, request, operation: str, runs, note: str) -> Outcome:
        done, errors = 0, []
        for run in runs:
            try:
                getattr(sagas, operation)(run, actor=request.user.get_username(), note=note)
            except sagas.SagaError as exc:
                errors.append(str(exc))
            else:
                done += 1
        return Outcome(done, len(errors), errors[0] if errors else "")

    def confirmation_summary(self, run: SagaRun) -> str:
        error = _shown_error(run, run.error)  # masked: the run was not fetched to reveal
        return f"{run.name} — {run.status}" + (f": {Truncator(error).chars(160)}" if error else "")

    @admin.action(permissions=["resume"], description="Resume selected runs from the failed step")
    def resume_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "resume")

    @admin.action(permissions=["compensate"], description="Compensate selected runs")
    def compensate_selected(self, request, queryset):
        return self.confirm_selected(request, queryset, "compensate")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        run = self.object_or_none(request, object_id)
        status = run.status if run is not None else None
        extra_context = {
            **(extra_context or {}),
            "can_resume": (status in OPERATIONS["resume"].statuses
                           and self.has_resume_permission(request)),
            "can_compensate": (status in OPERATIONS["compensate"].statuses
                               and self.has_compensate_permission(request)),
            "can_reveal": (run is not None and request.GET.get("reveal") != "1"
                           and request.user.has_perm("recovery.reveal_deadletter_secrets")),
        }
        if (run is not None and request.method == "GET" and request.GET.get("reveal") == "1"
                and request.user.has_perm("recovery.reveal_deadletter_secrets")):
            # Written before the page is built: a reveal whose audit fails does not happen.
            record_saga_reveal(run.pk, actor=request.user.get_username(),
                               via="admin change page")
        return super().change_view(request, object_id, form_url, extra_context)
