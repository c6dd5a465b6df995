"""Park a new letter and its FAILURE result in one PostgreSQL statement.

The common case (a task id parked for the first time, django-celery-results as
the result backend) would otherwise cost a transaction of six round trips.
One data-modifying CTE inserts the letter and, only if the letter was new,
upserts the FAILURE row, atomically and in a single round trip, so parking
costs less than django-celery-results storing the FAILURE on its own. Any
other case (a conflict, another backend or database) returns None and the
general path in :mod:`recovery.store.parking` handles it.

The same statement links the new letter to its fingerprint's open incident, if
one is open, and counts it there: in a storm of one failure that link is the
one thing escalation does for every letter, and as a statement of its own it
cost each letter a second round trip and a second wait on the incident's row.
What the statement found is kept for the escalation listener
(:func:`take_incident_link`), which then skips its own look-up.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from celery import states
from django.db import connection
from django.utils import timezone

from .models import DeadLetter, Incident
from ..core.names import logger_for

__all__ = ["insert_new_letter", "missing_internals", "IncidentLink", "take_incident_link",
           "link_to_open_incident"]

logger = logger_for(__name__)

_LETTER_JSON = ("args", "kwargs", "headers", "history")
# django-celery-results' parts the fast path builds the FAILURE row with; the private
# ones are how its DatabaseBackend.store_result builds it.
_BACKEND_ATTRIBUTES = ("TaskModel", "encode_result", "encode_content", "current_task_children",
                       "_get_meta_from_request", "_get_extended_properties")


@dataclass(frozen=True)
class IncidentLink:
    """What the letter's statement found of its fingerprint's open incident."""

    letter_id: int
    #: the open incident the letter was linked to and counted in; None when none was open
    incident_id: int | None = None
    #: whether this letter moved the incident's ``last_seen_at`` (at most once a second),
    #: which is when its diagnostics are rewritten too
    moved_last_seen: bool = False


#: The last link this context's fast path made; one slot, so a listener that is not
#: connected leaves nothing to pile up.
_last_link: ContextVar[IncidentLink | None] = ContextVar("recovery_incident_link", default=None)


def take_incident_link(letter_id: int) -> IncidentLink | None:
    """The incident link the fast path made for ``letter_id`` (once), or None when the
    letter was written another way and its incident is still to be looked up."""
    link = _last_link.get()
    if link is None or link.letter_id != letter_id:
        return None
    _last_link.set(None)
    return link


# Statuses as recovery.store.models.Incident.Status spells them (the partial unique index
# that allows one open incident per fingerprint uses the same two).
_OPEN = (Incident.Status.OPEN.value, Incident.Status.ACKNOWLEDGED.value)


#: ``last_seen_at`` moves at most once a second in a storm (with the diagnostics, which
#: escalation refreshes as often): an update that changes only ``count``, which no index
#: holds, is a heap-only update, where moving an indexed timestamp on every letter wrote
#: four index entries and left a dead version of the row in each of them.
#: Its two parameters are both the time of the letter.
TOUCH_LAST_SEEN = "CASE WHEN last_seen_at < %s - interval '1 second' THEN %s ELSE last_seen_at END"


def _incident_ctes() -> str:
    incident = Incident._meta.db_table
    through = Incident.letters.through._meta.db_table
    return (
        f', incident AS (SELECT id, last_seen_at FROM "{incident}" '
        f"WHERE fingerprint = %s AND status IN (%s, %s) AND EXISTS (SELECT 1 FROM letter) "
        # Locked as it is read: the update needs the lock anyway, and so the incident read
        # is the latest version (one resolved a moment ago is not linked to).
        f"FOR UPDATE)"
        f', linked AS (INSERT INTO "{through}" (incident_id, deadletter_id) '
        f"SELECT incident.id, letter.id FROM incident, letter ON CONFLICT DO NOTHING "
        f"RETURNING incident_id)"
        f', touched AS (UPDATE "{incident}" SET count = count + (SELECT count(*) FROM linked), '
        f"last_seen_at = {TOUCH_LAST_SEEN} WHERE id IN (SELECT id FROM incident) "
        f"RETURNING id, last_seen_at)"
    )


def _is_django_celery_results(backend: Any) -> bool:
    cls = backend if isinstance(backend, type) else type(backend)
    return cls.__module__.startswith("django_celery_results.")


def missing_internals(backend: Any) -> str | None:
    """What is missing, for a django-celery-results backend (instance or class), of the
    internals the fast path uses; None when all are there or it is another backend.
    Without them every letter would silently take the six-round-trip general path."""
    if backend is None or not _is_django_celery_results(backend):
        return None
    missing = [name for name in _BACKEND_ATTRIBUTES if not hasattr(backend, name)]
    if not missing:
        return None
    try:
        release = version("django-celery-results")
    except PackageNotFoundError:
        release = "(unknown version)"
    return (f"django-celery-results {release} has no DatabaseBackend.{', '.join(missing)}: "
            f"recovery.store.pg_fastpath cannot store a letter's FAILURE result with the letter. "
            f"Install a django-celery-results release celery-recovery is tested with (2.6), "
            f"or upgrade celery-recovery.")


def applicable(backend: Any) -> bool:
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return False
    if backend is None:
        return True
    return _is_django_celery_results(backend)


def _result_row(backend: Any, record: Any, request: Any) -> dict[str, Any] | None:
    from django_celery_results.models import TaskResult

    if backend is None or record.result is None:
        return None
    if not isinstance(backend.TaskModel(), TaskResult):
        return None
    traceback = record.result.get("traceback")
    encoded = backend.encode_result(record.result["result"], states.FAILURE)
    content_type, content_encoding, result = backend.encode_content(encoded)
    meta = {**backend._get_meta_from_request(request),
            "children": backend.current_task_children(request)}
    _, _, encoded_meta = backend.encode_content(meta)
    row = {
        "task_id": record.task_id, "status": states.FAILURE, "result": result,
        "traceback": traceback, "meta": encoded_meta, "content_type": content_type,
        "content_encoding": content_encoding,
        **backend._get_extended_properties(request, traceback),
    }
    return row


def insert_new_letter(values: dict[str, Any], record: Any, backend: Any, request: Any) -> int | None:
    """Insert the letter (and result); returns its id, or None if the task id already has one."""
    from django_celery_results.models import TaskResult

    try:
        result_row = _result_row(backend, record, request)
    except (AttributeError, TypeError):
        # The worker refuses to start without these internals (recovery.delivery.housekeeping);
        # here, outside a worker, park on the general path, but say so.
        logger.warning("recovery: fast path unavailable, parking %s on the general path: %s",
                     record.task_id, missing_internals(backend) or "see traceback",
                     exc_info=True)
        return None
    if record.result is not None and result_row is None:
        return None
    now = timezone.now()
    letter = {**values, "created_at": now, "updated_at": now, "replay_count": 0}
    letter_columns = [DeadLetter._meta.get_field(name).column for name in letter]
    letter_params = [json.dumps(v) if name in _LETTER_JSON else v for name, v in letter.items()]
    placeholders = ", ".join("%s::jsonb" if name in _LETTER_JSON else "%s" for name in letter)
    sql = (
        f'WITH letter AS (INSERT INTO "{DeadLetter._meta.db_table}" '
        f'({", ".join(f"{c!s}" for c in letter_columns)}) VALUES ({placeholders}) '
        'ON CONFLICT (task_id) DO NOTHING RETURNING id)'
    )
    params: list[Any] = list(letter_params)
    if result_row is not None:
        table = TaskResult._meta.db_table
        result_row = {**result_row, "date_created": now, "date_done": now}
        columns = [TaskResult._meta.get_field(name).column for name in result_row]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns
                            if c not in ("task_id", "date_created"))
        sql += (
            f', result AS (INSERT INTO "{table}" ({", ".join(columns)}) '
            f'SELECT {", ".join(["%s"] * len(columns))} WHERE EXISTS (SELECT 1 FROM letter) '
            f'ON CONFLICT (task_id) DO UPDATE SET {updates})'
        )
        params.extend(result_row.values())
    link = _run_with_incident_link(sql, params, values["fingerprint"], now)
    if link is None:
        return None
    _last_link.set(link)
    return link.letter_id


def link_to_open_incident(letter_id: int, fingerprint: str) -> IncidentLink:
    """Link a letter already written to its fingerprint's open incident, if one is open,
    and count it there: the same statement the fast path appends to the letter's."""
    link = _run_with_incident_link("WITH letter AS (SELECT %s::bigint AS id)", [letter_id],
                                   fingerprint, timezone.now())
    return link or IncidentLink(letter_id)  # (the letter CTE always has its one row)


def _run_with_incident_link(letter_sql: str, params: list[Any], fingerprint: str,
                            now: Any) -> IncidentLink | None:
    """Run ``letter_sql`` (a WITH clause whose CTE ``letter`` yields the letter's id, when
    there is one) with the incident link appended; None when ``letter`` was empty."""
    sql = letter_sql + _incident_ctes() + (
        " SELECT letter.id, touched.id, touched.last_seen_at IS DISTINCT FROM "
        "(SELECT last_seen_at FROM incident) FROM letter LEFT JOIN touched ON true")
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, fingerprint, *_OPEN, now, now])
        row = cursor.fetchone()
    if not row:
        return None
    letter_id, incident_id, moved = row
    return IncidentLink(letter_id, incident_id, bool(incident_id and moved))
