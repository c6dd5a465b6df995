"""Confirm, then act: the one flow behind every bulk or destructive operation of the
operator surface (dead letters, incidents, saga runs).

Django's own ``delete_selected`` is the model. A bulk action first answers a page that
says what will happen to which objects, and acts only when that page is posted back
with ``post=yes``. An object's operation URL (``<id>/<operation>/``) asks on GET and
acts on POST (the buttons on an object's page post straight to it). Either way:

- the permission is checked again on every request, not only when the button was drawn;
- only the selected objects in a status the operation applies to are acted on; the
  page says how many others are left alone;
- a note that cannot be stored (a NUL) is refused before anything runs;
- the operation ends with one pluralised message;
- the page shows each object through ``confirmation_summary``, which masks what a
  person may not see: a confirmation page never reveals secrets.

What differs between the admins is data (an ``Operation`` per operation, a few words)
and two hooks: ``perform`` (call the service) and ``confirmation_summary``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import model_ngettext
from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.text import capfirst
from django.utils.translation import ngettext

from .hostile import NUL_REFUSED, posted_note

__all__ = ["ConfirmedOperationsMixin", "Operation", "Outcome", "ROWS_SHOWN"]

#: objects a confirmation page lists one by one; the rest it counts
ROWS_SHOWN = 200


@dataclass(frozen=True)
class Operation:
    """One thing an operator may do to objects of a model, e.g. resolve an incident.

    Attributes:
        permission: its codename in the model's app, e.g. ``"resolve_incident"``.
        past: the past tense the message uses: "2 incidents were *resolved*."
        statuses: the ``status`` values it acts on; selected objects in another status
            are left alone, and the confirmation page says so.
        explanation: what it does, for the confirmation page (``explain`` may say more).
        state: how the page names ``statuses`` ("not *open or acknowledged*"); by default
            the statuses joined with commas.
    """

    permission: str
    past: str
    statuses: tuple[str, ...]
    explanation: str = ""
    state: str = ""

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", ", ".join(self.statuses))


@dataclass(frozen=True)
class Outcome:
    """What an operation did: how many objects it changed, how many it could not, and why
    the first of those could not."""

    done: int
    failed: int = 0
    first_error: str = ""


@dataclass(frozen=True)
class _Selection:
    objects: QuerySet  # what the operation acts on, in id order
    count: int  # how many objects that is
    skipped: int  # selected, but in a status the operation does not act on
    over_max: int | None  # how many it could act on, when more than one request takes


class ConfirmedOperationsMixin:
    """Mix into a ``ModelAdmin`` (before it) whose model has a ``status`` field.

    Declare ``operations``; implement ``perform`` and ``confirmation_summary``; add
    ``operation_urls(...)`` to ``get_urls``; write each bulk action as
    ``return self.confirm_selected(request, queryset, "<operation>")`` with
    ``@admin.action(permissions=["<operation>"])`` (Django then needs a
    ``has_<operation>_permission`` method: return ``has_operation_permission``).
    """

    operations: Mapping[str, Operation] = {}
    confirmation_template = "admin/recovery/confirm.html"
    #: the label of the note field on the confirmation page
    confirmation_note_label = "Note for the audit trail:"
    #: what the page calls the objects an operation acts on (singular, plural);
    #: None: the model's verbose names
    confirmation_noun: tuple[str, str] | None = None
    #: what it calls a selected object it leaves alone: "1 selected *run* that is not
    #: held"; None: the model's verbose names
    confirmation_item: tuple[str, str] | None = None
    #: objects one request acts on (``get_bulk_max``); see ``refuse_bulk`` for more
    bulk_max = 500

    # -- what each admin supplies --------------------------------------------------------

    def perform(self, request: HttpRequest, operation: str, objects: QuerySet,
                note: str) -> Outcome:
        """Run ``operation`` on ``objects`` (through the service ``manage.py`` calls too)."""
        raise NotImplementedError

    def confirmation_summary(self, obj: Model) -> str:
        """One line about ``obj`` for the confirmation page, as any operator may see it."""
        raise NotImplementedError

    def explain(self, operation: str, objects: QuerySet) -> str:
        """What ``operation`` will do to ``objects``, for the confirmation page."""
        return self.operations[operation].explanation

    def act_on_one(self, request: HttpRequest, operation: str, obj: Model, note: str) -> None:
        """The POST of an object's operation URL: by default, a selection of one."""
        self.report(request, operation,
                    self.perform(request, operation, self._only(obj), note))

    def get_bulk_max(self, request: HttpRequest) -> int:
        return self.bulk_max

    def refuse_bulk(self, request: HttpRequest, operation: str, count: int) -> bool:
        """Whether to refuse (after telling the user why) a bulk operation on ``count``
        objects, more than ``get_bulk_max``. By default it acts on the first ones by id
        and the confirmation page says so."""
        return False

    # -- permission ----------------------------------------------------------------------

    def has_operation_permission(self, request: HttpRequest, operation: str) -> bool:
        return request.user.has_perm(
            f"{self.opts.app_label}.{self.operations[operation].permission}")

    # -- a bulk action -------------------------------------------------------------------

    def confirm_selected(self, request: HttpRequest, queryset: QuerySet,
                         operation: str) -> TemplateResponse | None:
        """The body of a bulk action: the confirmation page or, posted back from it, the
        operation on those selected objects it applies to, and one message."""
        if not self.has_operation_permission(request, operation):
            raise PermissionDenied
        selection = self._select(request, queryset, operation)
        if selection.over_max and self.refuse_bulk(request, operation, selection.over_max):
            return None
        if request.POST.get("post") == "yes":
            self.run_operation(request, operation, selection.objects)
            return None
        return self._confirmation_page(request, operation, selection, {
            "action_name": f"{operation}_selected",
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "selected_pks": list(queryset.values_list("pk", flat=True)),
            "back_url": reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist"),
            "title": f"{capfirst(operation)} "
                     f"{model_ngettext(self.opts, selection.count + selection.skipped)}?",
        })

    def run_operation(self, request: HttpRequest, operation: str, objects: QuerySet) -> None:
        """Run ``operation`` on ``objects`` with the posted note; one message says how it went."""
        note = self._posted_note(request)
        if note is not None:
            self.report(request, operation, self.perform(request, operation, objects, note))

    def report(self, request: HttpRequest, operation: str, outcome: Outcome) -> None:
        """One pluralised message: "2 incidents were resolved." and what could not be."""
        message = ngettext("%(count)d %(items)s was %(past)s.",
                           "%(count)d %(items)s were %(past)s.", outcome.done) % {
            "count": outcome.done, "items": model_ngettext(self.opts, outcome.done),
            "past": self.operations[operation].past}
        if outcome.failed:
            message += " " + ngettext("%(count)d could not be: %(error)s",
                                      "%(count)d could not be; first error: %(error)s",
                                      outcome.failed) % {"count": outcome.failed,
                                                         "error": outcome.first_error}
        ok = outcome.done and not outcome.failed
        self.message_user(request, message, messages.SUCCESS if ok else messages.WARNING)

    # -- one object: <id>/<operation>/ ---------------------------------------------------

    def operation_urls(self, *operations: str) -> list[URLPattern]:
        """``<id>/<operation>/`` for each of ``operations``, named
        ``<app>_<model>_<operation>``, behind the admin site's login and CSRF checks."""
        view = self.admin_site.admin_view(self.operation_view)
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        return [path(f"<int:object_id>/{name}/", view, {"operation": name},
                     name=f"{info}_{name}") for name in operations]

    def operation_view(self, request: HttpRequest, object_id: int,
                       operation: str) -> HttpResponse:
        """GET asks for confirmation; POST acts and goes back to the object's page."""
        if operation not in self.operations:
            raise Http404(f"unknown operation {operation!r}")
        if not (self.has_view_permission(request)
                and self.has_operation_permission(request, operation)):
            raise PermissionDenied  # before the lookup: no answer says whether it exists
        # Not get_object(): it may honour ?reveal=1, and this page never reveals.
        selected = self.get_queryset(request).filter(pk=object_id)
        obj = selected.first()
        if obj is None:
            raise Http404(f"no {self.opts.verbose_name} {object_id}")
        change_url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
                             args=[obj.pk])
        if request.method == "POST":
            note = self._posted_note(request)
            if note is not None:
                self.act_on_one(request, operation, obj, note)
            return HttpResponseRedirect(change_url)
        return self._confirmation_page(
            request, operation, self._select(request, selected, operation),
            {"single": True, "back_url": change_url,
             "title": f"{capfirst(operation)} {self.opts.verbose_name} {obj.pk}?"})

    # -- shared ---------------------------------------------------------------------------

    def _only(self, obj: Model) -> QuerySet:
        return self.model._default_manager.filter(pk=obj.pk)

    def _posted_note(self, request: HttpRequest) -> str | None:
        """The posted note, or None (and an error message) when it cannot be stored."""
        note = posted_note(request)
        if note is None:
            self.message_user(request, f"The note {NUL_REFUSED}.", messages.ERROR)
            return None
        return note.strip()

    def _select(self, request: HttpRequest, queryset: QuerySet, operation: str) -> _Selection:
        actionable = (queryset.filter(status__in=self.operations[operation].statuses)
                      .order_by("pk"))
        count = actionable.count()
        skipped = queryset.count() - count
        most = self.get_bulk_max(request)
        if count <= most:
            return _Selection(actionable, count, skipped, None)
        first = list(actionable.values_list("pk", flat=True)[:most])
        return _Selection(actionable.filter(pk__in=first), most, skipped, count)

    def _confirmation_page(self, request: HttpRequest, operation: str, selection: _Selection,
                           context: dict[str, Any]) -> TemplateResponse:
        opts = self.opts
        noun = self.confirmation_noun or (opts.verbose_name, opts.verbose_name_plural)
        item = self.confirmation_item or (opts.verbose_name, opts.verbose_name_plural)
        rows = [(obj.pk, self.confirmation_summary(obj))
                for obj in selection.objects[:ROWS_SHOWN]]
        return TemplateResponse(request, self.confirmation_template, {
            **self.admin_site.each_context(request),
            "opts": opts,
            "media": self.media,
            "operation": operation,
            "count": selection.count,
            "noun": noun[selection.count != 1],
            "skipped": selection.skipped,
            "item": item[0],
            "items": item[1],
            "state": self.operations[operation].state,
            "over_max": selection.over_max,
            "bulk_max": self.get_bulk_max(request),
            "explanation": self.explain(operation, selection.objects) if selection.count else "",
            "rows": rows,
            "more": selection.count - len(rows),
            "note_label": self.confirmation_note_label,
            **context,
        })
