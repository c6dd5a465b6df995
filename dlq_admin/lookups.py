"""What a change list may be filtered by: the one rule for every admin of the operator surface.

Django's ``ModelAdmin.lookup_allowed`` lets any lookup on a model's own fields through the
query string. On a dead letter that is an oracle: ``?kwargs__card_token__regex=^tok_live_[a-m]``
answers one letter or none, so comparing result counts reads a masked secret one bit per
request. ``SafeLookupsMixin`` allows instead only:

- the parameters of the admin's declared ``list_filter`` and ``date_hierarchy``, and
  ``filter_fields`` (fields the project itself links to, e.g. ``?fingerprint=``), each with
  a comparison (``exact``, ``in``, ``gte``...) but never a pattern (``regex``,
  ``contains``...) or a path into a JSON value;
- any lookup into the admin's ``payload_fields`` (arguments, headers, bodies, tracebacks,
  saga context...) for a user who may see them anyway (``recovery.reveal_deadletter_secrets``).

Anything else, and any value holding a NUL (which PostgreSQL cannot compare), is refused
the way Django refuses a lookup: ``DisallowedModelAdminLookup``, a 400. Searching (``?q=``)
never looks into ``payload_fields`` for a user who may not reveal them either (a search
term holding a NUL Django's own search form refuses with a message).
"""

from __future__ import annotations

from django.contrib.admin import SimpleListFilter
from django.contrib.admin.utils import unquote
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest

from .hostile import has_nul

__all__ = ["SafeLookupsMixin", "COMPARISONS", "REVEAL_PERMISSION"]

REVEAL_PERMISSION = "recovery.reveal_deadletter_secrets"

#: what may follow an allowed field: comparisons of the whole value (those the admin's own
#: filters and date hierarchy send), never a pattern match nor a key path into JSON
COMPARISONS = frozenset({"exact", "iexact", "in", "isnull", "gt", "gte", "lt", "lte",
                         "year", "month", "day"})


class SafeLookupsMixin:
    """Mix into a ``ModelAdmin`` before ``admin.ModelAdmin``; declare ``payload_fields``
    (and ``filter_fields`` for linked-to fields that are not in ``list_filter``)."""

    #: fields (or relations) whose content may hold secrets
    payload_fields: tuple[str, ...] = ()
    #: further fields the project links to with a query parameter
    filter_fields: tuple[str, ...] = ()

    def may_reveal(self, request: HttpRequest | None) -> bool:
        return request is not None and request.user.has_perm(REVEAL_PERMISSION)

    def _filter_parameters(self, request: HttpRequest | None) -> tuple[set[str], set[str]]:
        """(parameters allowed as they are, fields allowed with a comparison)."""
        exact, fields = set(), set(self.filter_fields)
        list_filter = self.get_list_filter(request) if request is not None else self.list_filter
        for item in list_filter:
            if isinstance(item, type) and issubclass(item, SimpleListFilter):
                exact.add(item.parameter_name)
            elif isinstance(item, (list, tuple)):
                fields.add(item[0])
            else:
                fields.add(item)
        if self.date_hierarchy:
            fields.add(self.date_hierarchy)
        return exact, fields

    def lookup_allowed(self, lookup: str, value, request: HttpRequest | None = None) -> bool:
        if has_nul(str(value)):
            return False
        exact, fields = self._filter_parameters(request)
        if lookup in exact:
            return True
        field, _, rest = lookup.partition(LOOKUP_SEP)
        if field in self.payload_fields:
            return self.may_reveal(request) and super().lookup_allowed(lookup, value, request)
        if field not in fields or (rest and rest not in COMPARISONS):
            return False
        return super().lookup_allowed(lookup, value, request)

    def object_or_none(self, request: HttpRequest, object_id: str):
        """The object an admin URL names, or None for an id that names none (not a
        number, a NUL, out of range): Django's own tolerant ``get_object``, so an extra
        view answers as the change page does, never with a database error."""
        return self.get_object(request, unquote(object_id))

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        fields = super().get_search_fields(request)
        if self.may_reveal(request):
            return fields
        return tuple(f for f in fields
                     if f.lstrip("^=@").partition(LOOKUP_SEP)[0] not in self.payload_fields)
