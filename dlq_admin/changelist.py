"""The dead-letter change list at a million rows: the same page, without full-table work.

Measured by ``bench/changelist.py`` (1,000,000 letters on PostgreSQL), Django's defaults
scanned the whole table on every page load:

- the task-name filter's choices: ``SELECT DISTINCT task_name`` over every row;
- ``date_hierarchy``: ``SELECT DISTINCT DATE_TRUNC(...)`` over every row of the current
  selection (all of it unfiltered: every letter falls in one year, so Django drills down to
  months at once);
- the paginator's ``COUNT(*)`` over the whole selection;
- a search for a task id: ``UPPER(task_id) = UPPER(...)`` (no index) OR'ed with two
  ``LIKE '%...%'``, four times per page.

``ChangeListAtScale`` (mixed into ``DeadLetterAdmin``) and ``TaskNameFilter`` replace each
with index lookups; what the page shows is unchanged except the result count above
``EstimatedCountPaginator.exact_up_to`` (an estimate, see there).
"""

from __future__ import annotations

import datetime
import json
import re

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Min, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone
from django.utils.functional import cached_property

from recovery.models import DeadLetter

__all__ = ["TaskNameFilter", "ChangeListAtScale", "EstimatedCountPaginator", "task_names"]

#: what a task id looks like: a Celery UUID, or poison-<sha256> for a body without one
TASK_ID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}|poison-[0-9a-f]{64}")


def task_names(using: str = "default") -> list[str]:
    """Every distinct task name, by a loose index scan: one index probe per name
    (``MIN(task_name) WHERE task_name > previous``), not a scan of every row."""
    connection = connections[using]
    table = connection.ops.quote_name(DeadLetter._meta.db_table)
    column = connection.ops.quote_name(DeadLetter._meta.get_field("task_name").column)
    sql = f"""
        WITH RECURSIVE names(name) AS (
            SELECT MIN({column}) FROM {table}
            UNION ALL
            SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > names.name)
            FROM names WHERE names.name IS NOT NULL
        )
        SELECT name FROM names WHERE name IS NOT NULL
    """
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return [row[0] for row in cursor.fetchall()]


class TaskNameFilter(admin.SimpleListFilter):
    """The task-name filter (same ``?task_name=`` parameter as Django's field filter),
    whose choices come from ``task_names()`` instead of ``SELECT DISTINCT``."""

    title = "task name"
    parameter_name = "task_name"

    def lookups(self, request, model_admin):
        return [(name, name) for name in task_names(model_admin.get_queryset(request).db)]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(task_name=value) if value else queryset


def _truncate(value: datetime.datetime, kind: str) -> datetime.datetime:
    value = value.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind in ("year", "month"):
        value = value.replace(day=1)
    if kind == "year":
        value = value.replace(month=1)
    return value


def _following(value: datetime.datetime, kind: str) -> datetime.datetime:
    if kind == "day":
        return value + datetime.timedelta(days=1)
    if kind == "month":
        return value.replace(year=value.year + value.month // 12, month=value.month % 12 + 1)
    return value.replace(year=value.year + 1)


class _DatesByIndexQuerySet(QuerySet):
    """``datetimes()`` as ``date_hierarchy`` asks for it (the years, months or days that
    hold at least one row of this selection), by a loose index scan through the field's
    index (``recovery_dl_last_failed``): from each date found, the next is the first row at
    or after the start of the following year, month or day. On PostgreSQL that is one
    recursive query; elsewhere one ``MIN()`` query per date. Never
    ``SELECT DISTINCT DATE_TRUNC(...)`` over every selected row."""

    def datetimes(self, field_name, kind, order="ASC", tzinfo=None):
        if kind not in ("year", "month", "day"):
            return super().datetimes(field_name, kind, order, tzinfo)
        tz = (tzinfo or timezone.get_current_timezone()) if settings.USE_TZ else None
        firsts = (self._firsts_in_one_query(field_name, kind, tz)
                  if tz is not None and connections[self.db].vendor == "postgresql"
                  else self._firsts_one_by_one(field_name, kind, tz))
        found = []
        for first in firsts:
            naive = _truncate(timezone.make_naive(first, tz) if tz else first, kind)
            found.append(timezone.make_aware(naive, tz) if tz else naive)
        return found if order == "ASC" else found[::-1]

    def _firsts_in_one_query(self, field_name, kind, tz) -> list[datetime.datetime]:
        connection = connections[self.db]
        # The time zone as Django's Trunc() passes it to PostgreSQL.
        zone = connection.ops._prepare_tzname_delta(timezone._get_timezone_name(tz))
        column = self.order_by(field_name).values_list(field_name, flat=True)
        following = RawSQL("(date_trunc(%s, d.first AT TIME ZONE %s) + %s::interval) AT TIME ZONE %s",
                           (kind, zone, f"1 {kind}", zone))
        start_sql, start_params = column[:1].query.sql_with_params()
        next_sql, next_params = (column.filter(**{f"{field_name}__gte": following})[:1]
                                 .query.sql_with_params())
        sql = (f"WITH RECURSIVE d(first) AS (({start_sql}) UNION ALL "
               f"SELECT ({next_sql}) FROM d WHERE d.first IS NOT NULL) "
               f"SELECT first FROM d WHERE first IS NOT NULL")
        with connection.cursor() as cursor:
            cursor.execute(sql, (*start_params, *next_params))
            return [row[0] for row in cursor.fetchall()]

    def _firsts_one_by_one(self, field_name, kind, tz) -> list[datetime.datetime]:
        selection = self.order_by()
        firsts = []
        low = None
        while True:
            rows = selection if low is None else selection.filter(**{f"{field_name}__gte": low})
            first = rows.aggregate(first=Min(field_name))["first"]
            if first is None:
                return firsts
            firsts.append(first)
            following = _following(_truncate(timezone.make_naive(first, tz) if tz else first,
                                             kind), kind)
            low = timezone.make_aware(following, tz) if tz else following


class _DeadLetterChangeList(ChangeList):
    def get_queryset(self, request, exclude_parameters=None):
        queryset = super().get_queryset(request, exclude_parameters)
        return _DatesByIndexQuerySet(model=queryset.model, query=queryset.query.chain(),
                                     using=queryset._db, hints=queryset._hints)


class EstimatedCountPaginator(Paginator):
    """Counts exactly up to ``exact_up_to`` rows (a bounded ``COUNT`` over a ``LIMIT``);
    above that, on PostgreSQL, shows the planner's estimate of the selection's size, so
    neither the list nor its page links wait for ``COUNT(*)`` over a million rows.
    Elsewhere (SQLite) it counts exactly."""

    exact_up_to = 10_000

    @cached_property
    def count(self) -> int:
        rows = self.object_list
        if not isinstance(rows, QuerySet) or connections[rows.db].vendor != "postgresql":
            return super().count
        exact = rows.order_by()[: self.exact_up_to + 1].count()
        if exact <= self.exact_up_to:
            return exact
        sql, params = rows.order_by().query.sql_with_params()
        with connections[rows.db].cursor() as cursor:
            cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
            plan = cursor.fetchone()[0]
        if isinstance(plan, str):
            plan = json.loads(plan)
        return max(exact, int(plan[0]["Plan"]["Plan Rows"]))


class ChangeListAtScale:
    """For ``DeadLetterAdmin``: the change list through indexes (see the module docstring)."""

    paginator = EstimatedCountPaginator

    def get_changelist(self, request, **kwargs):
        return _DeadLetterChangeList

    def get_search_results(self, request, queryset, search_term):
        # A task id is answered by the unique index on task_id, when a letter has it; any
        # other term (or an id no letter has) gets the configured search_fields.
        term = search_term.strip()
        if TASK_ID.fullmatch(term):
            exact = queryset.filter(task_id__in={term, term.lower()})
            if exact.exists():
                return exact, False
        return super().get_search_results(request, queryset, search_term)
