"""The admin for circuit breakers, degraded modes and fallback uses.

``/admin/recovery/sharedstate/`` is one page for the state every worker shares: each known
circuit (state, open until, calls and failures in its window) with Reset and Trip, and each
degraded mode with On and Off. It reads and writes through ``recovery.workflows.shared_state``
(Redis, or the database on the embedded default), never the raw rows. Seeing it needs
``recovery.view_sharedstate``; the buttons need ``recovery.change_sharedstate``, are POST
only, and are checked again on every request. ``FallbackUse`` rows (a task that returned
its fallback's result) are listed read-only.

Registered by importing this module from ``dlq_admin/admin.py``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from recovery.workflows import degraded
from recovery.workflows.circuit import Circuit
from recovery.models import FallbackUse, SharedState

from .lookups import SafeLookupsMixin
from .resilience import NAME, circuit_rows, known_circuits, mode_rows

logger = logging.getLogger("recovery.circuit")


@admin.register(SharedState)
class ResilienceAdmin(admin.ModelAdmin):
    """Circuits and degraded modes (the ``SharedState`` model is only where they live on
    the database store; the page works the same on Redis)."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.overview_view), name="recovery_sharedstate_changelist"),
            path("circuits/<str:name>/<str:operation>/", wrap(self.circuit_view),
                 name="recovery_sharedstate_circuit"),
            path("degraded/", wrap(self.degraded_view), name="recovery_sharedstate_degraded"),
        ]

    def _overview_url(self) -> str:
        return reverse("admin:recovery_sharedstate_changelist", current_app=self.admin_site.name)

    def overview_view(self, request):
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        modes, modes_error = mode_rows()
        since = timezone.now() - timedelta(hours=24)
        context = {
            **self.admin_site.each_context(request),
            "title": "Circuits and degraded modes",
            "opts": self.model._meta,
            "circuits": circuit_rows(),
            "modes": modes,
            "modes_error": modes_error,
            "can_change": self.has_change_permission(request),
            "fallbacks_24h": FallbackUse.objects.filter(at__gte=since).count(),
            "fallbacks_url": reverse("admin:recovery_fallbackuse_changelist",
                                     current_app=self.admin_site.name),
        }
        return TemplateResponse(request, "admin/recovery/sharedstate/overview.html", context)

    def _check_post(self, request):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_change_permission(request):
            raise PermissionDenied
        return None

    def circuit_view(self, request, name: str, operation: str):
        refused = self._check_post(request)
        if refused is not None:
            return refused
        if operation not in ("reset", "trip") or name not in known_circuits():
            raise Http404(f"no circuit {name!r}")
        actor = f"admin:{request.user.get_username()}"
        breaker = Circuit(name)
        try:
            if operation == "reset":
                breaker.reset()
            else:
                seconds = request.POST.get("seconds", "").strip()
                try:
                    value = float(seconds) if seconds else None
                except ValueError:
                    value = -1.0
                if value is not None and value <= 0:
                    self.message_user(request, f"Seconds must be a positive number, not "
                                               f"{seconds!r}; {name} unchanged.", messages.ERROR)
                    return HttpResponseRedirect(self._overview_url())
                breaker.trip(seconds=value)
        except Exception as exc:  # noqa: BLE001 - an unreachable store: tell the operator
            self.message_user(request, f"The shared state cannot be reached; {name} unchanged: "
                                       f"{exc}", messages.ERROR)
            return HttpResponseRedirect(self._overview_url())
        logger.warning("recovery: circuit %s %s by %s", name,
                       "reset (closed)" if operation == "reset" else "tripped (open)", actor)
        self.message_user(request, f"Circuit {name} is "
                                   f"{'closed' if operation == 'reset' else 'open'}.",
                          messages.SUCCESS)
        return HttpResponseRedirect(self._overview_url())

    def degraded_view(self, request):
        refused = self._check_post(request)
        if refused is not None:
            return refused
        mode = request.POST.get("mode", "").strip()
        on = request.POST.get("state") == "on"
        reason = request.POST.get("reason", "").strip()
        if not NAME.match(mode):
            self.message_user(request, f"{mode!r} is not a mode name (letters, digits, . _ : -).",
                              messages.ERROR)
            return HttpResponseRedirect(self._overview_url())
        if on and not reason:
            self.message_user(request, f"Say why {mode} is switched on (the reason is shown to "
                                       f"the other operators); {mode} unchanged.", messages.ERROR)
            return HttpResponseRedirect(self._overview_url())
        try:
            degraded.switch(mode, on, actor=f"admin:{request.user.get_username()}", reason=reason)
        except Exception as exc:  # noqa: BLE001
            self.message_user(request, f"The shared state cannot be reached; {mode} unchanged: "
                                       f"{exc}", messages.ERROR)
            return HttpResponseRedirect(self._overview_url())
        self.message_user(request, f"Degraded mode {mode} is {'on' if on else 'off'}.",
                          messages.SUCCESS)
        return HttpResponseRedirect(self._overview_url())


@admin.register(FallbackUse)
class FallbackUseAdmin(SafeLookupsMixin, admin.ModelAdmin):
    """Each time a task's fallback stood in for it: read-only, for the degradation's record."""

    # Text stored before it was scrubbed may quote secrets: no search or filter into it.
    payload_fields = ("exception_message",)

    list_display = ("at", "task_name", "reason", "dependency", "fallback", "exception_type",
                    "task_id")
    list_filter = ("reason", "task_name", "at")
    search_fields = ("=task_id", "task_name", "fallback", "exception_message")
    date_hierarchy = "at"
    fields = ("at", "task_id", "task_name", "reason", "dependency", "fallback", "exception_type",
              "exception_message")
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
