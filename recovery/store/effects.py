"""Effects that happen once: a task's writes to its own database, recorded with a proof.

A task that runs twice (a pool child killed after the commit but before the broker heard
the acknowledgement, a retry after a later step failed, an operator's replay) would write
its effect twice. ``effect_once`` opens a transaction, records ``(task id, effect name,
generation)`` in ``recovery_effect`` inside it, and tells the body whether this is the
first time; the body's own writes go in the same transaction, so the proof and the effect
commit together or not at all. A second run that races the first waits on the unique
constraint until the first commits (then skips) or rolls back (then runs).

Only effects in the database the proof is written to can be made once this way; for an
external call, pass :func:`idempotency_key` to the service (an ``Idempotency-Key`` header)
so the service can drop the repeat.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from django.db import connections, router, transaction
from django.db.models import Max
from django.utils import timezone

from .models import DeadLetter, Effect

__all__ = ["effect_once", "idempotency_key", "next_generation", "purge_effects"]

#: The namespace of idempotency keys: a key is a UUID5 of (task id, effect name, generation),
#: so anyone holding the three can compute it again, and it reveals none of them.
KEY_NAMESPACE = uuid.UUID("6f1d7f2e-5a8b-4c36-9a0e-3d1b2c4e5f60")


@contextmanager
def effect_once(task_id: str, name: str, *, generation: int = 0, task_name: str = "",
                using: str | None = None) -> Iterator[bool]:
    """A transaction in which ``name`` of task ``task_id`` is recorded; yields whether this
    is the first run to record it. Write the effect only when it is::

        with effect_once(task_id, "charge") as first:
            if first:
                Payment.objects.create(...)

    An exception inside the block rolls back the effect and its proof alike, so the next
    run (a retry, a redelivery) does it again.
    """
    _check_name(name)
    alias = using or router.db_for_write(Effect)
    with transaction.atomic(using=alias):
        yield _record(task_id, name, generation, task_name, alias)


def _record(task_id: str, name: str, generation: int, task_name: str, alias: str) -> bool:
    # One statement, no savepoint: a conflict is not an error that would abort the
    # transaction the effect's writes go in, and a concurrent first run's uncommitted row
    # makes this one wait for its outcome (PostgreSQL and SQLite >= 3.35 alike).
    connection = connections[alias]
    table = connection.ops.quote_name(Effect._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (task_id, name, generation, task_name, created_at) "
            f"VALUES (%s, %s, %s, %s, %s) "
            f"ON CONFLICT (task_id, name, generation) DO NOTHING RETURNING id",
            [task_id, name, generation, task_name[:255],
             connection.ops.adapt_datetimefield_value(timezone.now())])
        return cursor.fetchone() is not None


def idempotency_key(task_id: str, name: str, generation: int = 0) -> str:
    """A key for an external call, the same on every run of the same task id (retries,
    redeliveries, replays), different for another call of the task or an effect replayed
    to run again."""
    _check_name(name)
    return str(uuid.uuid5(KEY_NAMESPACE, f"{task_id}\x00{name}\x00{generation}"))


def next_generation(task_id: str) -> int:
    """The generation a replay that reruns ``task_id``'s effects runs them as: one past
    the newest recorded, so every effect's old proof no longer matches."""
    newest = Effect.objects.filter(task_id=task_id).aggregate(newest=Max("generation"))["newest"]
    return 0 if newest is None else newest + 1


def purge_effects(older_than: datetime, *, batch_size: int = 5000) -> int:
    """Delete the proofs recorded before ``older_than``, in batches; how many went.

    A proof only matters while its task may still run again: a redelivery or retry comes
    within minutes, a replay only while the task's letter is parked, so the proofs of a
    letter still parked or replaying are kept however old."""
    open_letters = DeadLetter.objects.filter(
        status__in=(DeadLetter.Status.PARKED, DeadLetter.Status.REPLAYING)).values("task_id")
    stale = Effect.objects.filter(created_at__lt=older_than).exclude(task_id__in=open_letters)
    deleted = 0
    while True:
        ids = list(stale.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted
        deleted += Effect.objects.filter(pk__in=ids).delete()[0]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"an effect's name is a non-empty string of at most 200 characters, "
                         f"not {name!r}")
