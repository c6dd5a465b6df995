"""How long dead letters are kept, and purging the ones past it.

Closed letters (resolved, discarded, compensated) are kept for
``RECOVERY["RETENTION_DAYS"]`` after they were closed (their ``updated_at``),
then ``manage.py dlq purge`` deletes them with their audit trail — and with
them the secrets their payloads hold. Parked letters are failures nobody has
handled: they are never purged unless asked for explicitly, and letters being
replayed are never purged at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from .. import conf
from .models import DeadLetter, DeliveryCount
from .effects import purge_effects
from ..core.names import logger_for

__all__ = ["RetentionError", "PurgePlan", "plan", "purge", "CLOSED"]

logger = logger_for(__name__)

CLOSED = (DeadLetter.Status.RESOLVED, DeadLetter.Status.DISCARDED, DeadLetter.Status.COMPENSATED)


class RetentionError(Exception):
    """The purge asked for would delete what must not be deleted; nothing was."""


@dataclass(frozen=True)
class PurgePlan:
    """Which letters a purge deletes: ``queryset``, and in words, ``cutoffs``."""

    queryset: QuerySet
    cutoffs: tuple[tuple[str, datetime], ...]

    def describe(self) -> str:
        if not self.cutoffs:
            return ("Nothing is past its retention: the statuses asked for are kept until a "
                    "purge names an age (--older-than).")
        return "Purging " + "; ".join(
            f"{status} letters closed before {cutoff:%Y-%m-%d %H:%M}" for status, cutoff in self.cutoffs
        ) + "."

    def narrowed(self, queryset: QuerySet) -> PurgePlan:
        return PurgePlan(self.queryset & queryset, self.cutoffs)


def retention_days() -> dict[str, float | None]:
    """The defaults, overridden status by status by ``RECOVERY["RETENTION_DAYS"]``
    (check E011 rejects unknown statuses). Parked letters have no retention: purging
    them always needs an explicit age."""
    days = {**conf.DEFAULTS["RETENTION_DAYS"], **dict(conf.get("RETENTION_DAYS") or {})}
    days.pop(DeadLetter.Status.PARKED, None)
    return days


def plan(letters: QuerySet | None = None, *, status: str | None = None,
         older_than: datetime | None = None, include_parked: bool = False) -> PurgePlan:
    """The letters of ``letters`` that a purge may delete.

    Without ``older_than`` each status keeps its ``RETENTION_DAYS``; a status whose
    retention is None is kept until a purge names an age.

    Raises:
        RetentionError: parked letters without ``include_parked``; replaying letters;
            parked letters without an age.
    """
    letters = DeadLetter.objects.all() if letters is None else letters
    if status == DeadLetter.Status.REPLAYING:
        raise RetentionError("replaying letters are in flight and are never purged; wait for "
                             "their replays to finish")
    if status == DeadLetter.Status.PARKED and not include_parked:
        raise RetentionError("refusing to purge parked letters: they are failures nobody has "
                             "handled. Replay, discard or resolve them, or add --include-parked "
                             "if you really mean to delete them")
    statuses = [status] if status else [*CLOSED, *([DeadLetter.Status.PARKED] if include_parked else [])]
    days = retention_days()
    now = timezone.now()
    condition = Q(pk__in=[])
    cutoffs = []
    for name in statuses:
        if older_than is not None:
            cutoff = older_than
        elif days.get(name) is not None:
            cutoff = now - timedelta(days=days[name])
        elif name == DeadLetter.Status.PARKED:
            raise RetentionError("purging parked letters needs an explicit age: --older-than 90d")
        else:
            continue  # kept until a purge names an age
        condition |= Q(status=name, updated_at__lt=cutoff)
        cutoffs.append((name, cutoff))
    return PurgePlan(letters.filter(condition), tuple(cutoffs))


def purge(purge_plan: PurgePlan, *, batch_size: int = 1000, actor: str = "system",
          progress: Callable[[int], None] | None = None) -> int:
    """Delete the plan's letters (and their audit events) in batches; returns how many.

    Each batch re-checks the plan under ``SELECT ... FOR UPDATE SKIP LOCKED``, so a
    letter replayed or re-parked meanwhile, or held by an operator, is left alone.
    Also forgets delivery counts nobody has touched for ``DELIVERY_COUNT_RETENTION_DAYS``
    and effect proofs older than ``EFFECTS_RETENTION_DAYS`` (:mod:`recovery.store.effects`).
    """
    deleted = 0
    last_pk = 0
    while True:
        with transaction.atomic():
            ids = list(
                purge_plan.queryset.filter(pk__gt=last_pk).order_by("pk")
                .select_for_update(skip_locked=True).values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                break
            last_pk = ids[-1]
            DeadLetter.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
        if progress is not None:
            progress(deleted)
    stale = timezone.now() - timedelta(days=conf.get("DELIVERY_COUNT_RETENTION_DAYS"))
    DeliveryCount.objects.filter(updated_at__lt=stale).delete()
    purge_effects(timezone.now() - timedelta(days=conf.get("EFFECTS_RETENTION_DAYS")))
    logger.info("%s purged %d dead letters (%s)", actor, deleted, purge_plan.describe())
    return deleted
