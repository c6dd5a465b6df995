"""The admin for failure rehearsals: start one, watch it, stop it, read its report, purge
what it left.

Starting, stopping and purging need ``recovery.run_rehearsal`` (and starting needs
``RECOVERY["REHEARSALS_ENABLED"]``); seeing the list and the reports needs
``recovery.view_rehearsal`` or that permission. Every operation goes through
``recovery.workflows.rehearsals`` / ``recovery.operations.rehearsal_report``, the same
services as ``manage.py rehearse``, and is audited (actor ``admin:<user>``).

Registered by importing this module from ``dlq_admin/admin.py``.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone

from recovery.models import Rehearsal, RehearsalEvent
from recovery.operations import rehearsal_report
from recovery.workflows import rehearsals

RUN = "recovery.run_rehearsal"


class RehearsalForm(forms.ModelForm):
    """What ``rehearse start`` asks for, checked by the same rules before anything starts."""

    duration = forms.CharField(
        label="For", initial="10m",
        help_text="How long it runs: 30s, 10m, 2h; 24 hours at most. It stops by itself then.")
    fault = forms.ChoiceField(choices=Rehearsal.Fault.choices)
    kind = forms.ChoiceField(choices=[(k, k) for k in rehearsals.KINDS], initial="dependency",
                             help_text="What the injected failure is classified as.")
    rate = forms.FloatField(min_value=0.0, max_value=1.0, initial=1.0,
                            help_text="The share of matching runs hit, in (0, 1].")

    class Meta:
        model = Rehearsal
        fields = ("task", "fault", "rate", "kind", "message")

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:
            data["parsed_duration"] = rehearsals.parse_duration(data.get("duration", ""))
            data["rate"] = rehearsals.validate(
                task=data["task"], fault=data["fault"], rate=data["rate"],
                duration=data["parsed_duration"], kind=data["kind"],
                message=data.get("message") or "")
        except ValueError as refused:
            raise forms.ValidationError(str(refused).replace("--", "")) from None
        return data


class RehearsalEventInline(admin.TabularInline):
    """Who started, stopped and purged it: never editable."""

    model = RehearsalEvent
    fields = ("at", "action", "actor", "note")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Rehearsal)
class RehearsalAdmin(admin.ModelAdmin):
    list_display = ("id", "task", "fault", "rate", "state", "started_at", "ends", "started_by")
    list_filter = ("fault",)
    ordering = ("-started_at", "-id")
    form = RehearsalForm
    inlines = (RehearsalEventInline,)
    readonly_fields = ("task", "fault", "rate", "kind", "message", "started_at", "expires_at",
                       "stopped_at", "started_by", "stopped_by")
    change_form_template = "admin/recovery/rehearsal/change_form.html"

    @admin.display(description="state")
    def state(self, obj: Rehearsal) -> str:
        return "running" if obj.is_running() else "ended"

    @admin.display(description="ends / ended")
    def ends(self, obj: Rehearsal):
        return obj.ended_at

    # -- permissions ------------------------------------------------------------------------

    def can_run(self, request) -> bool:
        return request.user.is_active and request.user.has_perm(RUN)

    def has_view_permission(self, request, obj=None) -> bool:
        return super().has_view_permission(request, obj) or self.can_run(request)

    def has_module_permission(self, request) -> bool:
        return super().has_module_permission(request) or self.can_run(request)

    def has_add_permission(self, request) -> bool:
        return self.can_run(request) and rehearsals.enabled()

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("task", "fault", "rate", "duration", "kind", "message")
        return self.readonly_fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.readonly_fields

    def get_inline_instances(self, request, obj=None):
        return [] if obj is None else super().get_inline_instances(request, obj)

    # -- start --------------------------------------------------------------------------------

    def save_model(self, request, obj, form, change) -> None:
        data = form.cleaned_data
        try:
            started = rehearsals.start(
                task=data["task"], fault=data["fault"], rate=data["rate"],
                duration=data["parsed_duration"], kind=data["kind"],
                message=data.get("message") or "",
                actor=f"admin:{request.user.get_username()}")
        except rehearsals.RehearsalsDisabled:
            raise PermissionDenied("rehearsals are off here") from None
        obj.__dict__.update({k: v for k, v in started.__dict__.items() if not k.startswith("_")})
        obj._state.adding = False

    def response_add(self, request, obj, post_url_continue=None):
        self.message_user(request, f"Rehearsal {obj.pk} started: {obj.fault} into {obj.task} "
                                   f"at rate {obj.rate:g}; workers see it within a second.",
                          messages.WARNING)
        return HttpResponseRedirect(reverse("admin:recovery_rehearsal_change", args=[obj.pk],
                                            current_app=self.admin_site.name))

    # -- the page of one rehearsal: its report, stop and purge ------------------------------

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<int:pk>/stop/", wrap(self.stop_view), name="recovery_rehearsal_stop"),
            path("<int:pk>/purge/", wrap(self.purge_view), name="recovery_rehearsal_purge"),
            *super().get_urls(),
        ]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        rehearsal = (Rehearsal.objects.filter(pk=object_id).first()
                     if str(object_id).isdigit() else None)
        extra = dict(extra_context or {})
        if rehearsal is not None and self.has_view_permission(request, rehearsal):
            found = rehearsal_report.report(rehearsal)
            extra.update({
                "report_text": rehearsal_report.format_report(found),
                "running": rehearsal.is_running(),
                "can_run": self.can_run(request),
                "tagged_letters_url": reverse("admin:recovery_deadletter_changelist",
                                              current_app=self.admin_site.name)
                + f"?rehearsal={rehearsal.pk}",
            })
        return super().change_view(request, object_id, form_url, extra)

    def _operation(self, request, pk: int) -> Rehearsal:
        if request.method != "POST":
            raise _NotAllowed
        if not self.can_run(request):
            raise PermissionDenied
        rehearsal = Rehearsal.objects.filter(pk=pk).first()
        if rehearsal is None:
            raise Http404(f"no rehearsal {pk}")
        return rehearsal

    def _back(self, pk: int) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:recovery_rehearsal_change", args=[pk],
                                            current_app=self.admin_site.name))

    def stop_view(self, request, pk: int):
        try:
            rehearsal = self._operation(request, pk)
        except _NotAllowed:
            return HttpResponseNotAllowed(["POST"])
        stopped = rehearsals.stop([rehearsal.pk], actor=f"admin:{request.user.get_username()}")
        self.message_user(request, f"Rehearsal {pk} stopped." if stopped else
                          f"Rehearsal {pk} had already ended.", messages.SUCCESS)
        return self._back(pk)

    def purge_view(self, request, pk: int):
        try:
            rehearsal = self._operation(request, pk)
        except _NotAllowed:
            return HttpResponseNotAllowed(["POST"])
        if request.POST.get("confirm") != "yes":
            self.message_user(request, "Tick the box to confirm the purge; nothing was deleted.",
                              messages.ERROR)
            return self._back(pk)
        try:
            counts = rehearsal_report.purge(rehearsal,
                                            actor=f"admin:{request.user.get_username()}")
        except rehearsal_report.RehearsalRunning as refused:
            self.message_user(request, str(refused).split(" (")[0] + ".", messages.ERROR)
            return self._back(pk)
        self.message_user(request, f"Rehearsal {pk}: deleted {counts['letters']} letters and "
                                   f"{counts['incidents']} incidents.", messages.SUCCESS)
        return self._back(pk)


class _NotAllowed(Exception):
    pass


def running_rehearsals() -> list[Rehearsal]:
    """For the dashboard's banner: what is failing on purpose right now."""
    return list(Rehearsal.objects.filter(stopped_at__isnull=True, expires_at__gt=timezone.now())
                .order_by("expires_at"))
