"""Failure groups: dead letters that share a fingerprint (same task, same error,
different data), so an operator can act on the whole group after one fix.

Read-only queries for the admin's group pages; the operations themselves go
through ``recovery.operations.replay.bulk`` like every other action.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Max, Min, Q, QuerySet

from recovery.core import redaction
from recovery.models import DeadLetter

__all__ = ["FailureGroup", "groups", "group_letters", "siblings", "shown_messages"]

#: groups shown per page; the largest first
PAGE_SIZE = 100


@dataclass(frozen=True)
class FailureGroup:
    fingerprint: str
    task_name: str
    exception_type: str
    sample_message: str
    total: int
    parked: int
    first_failed_at: datetime
    last_failed_at: datetime


def groups(status: str | None = DeadLetter.Status.PARKED, task_name: str | None = None,
           limit: int = PAGE_SIZE, since: datetime | None = None) -> list[FailureGroup]:
    """Groups of letters by fingerprint, largest first.

    ``status`` narrows the letters counted (parked by default: the groups that still need
    someone, cheap to compute through the status index even with millions of resolved
    rows); None counts every letter. ``since`` counts only letters that failed since then
    (the dashboard's last 24 hours, through ``recovery_dl_last_failed``).
    """
    letters = DeadLetter.objects.all()
    if status:
        letters = letters.filter(status=status)
    if task_name:
        letters = letters.filter(task_name=task_name)
    if since is not None:
        letters = letters.filter(last_failed_at__gte=since)
    rows = (
        letters.order_by().values("fingerprint")
        .annotate(total=Count("pk"),
                  parked=Count("pk", filter=Q(status=DeadLetter.Status.PARKED)),
                  first=Min("first_failed_at"), last=Max("last_failed_at"),
                  task=Max("task_name"), exception=Max("exception_type"), sample=Max("pk"))
        .order_by("-total", "-last")[:limit]
    )
    rows = list(rows)
    messages = shown_messages([row["sample"] for row in rows])
    return [
        FailureGroup(fingerprint=row["fingerprint"], task_name=row["task"],
                     exception_type=row["exception"],
                     sample_message=(messages.get(row["sample"]) or "")[:300],
                     total=row["total"], parked=row["parked"],
                     first_failed_at=row["first"], last_failed_at=row["last"])
        for row in rows
    ]


#: What redaction needs to scrub a letter's message (its payload and message envelope).
SCRUB_FIELDS = ("pk", "task_name", "args", "kwargs", "headers", "raw_body", "content_type",
                "exception_message")


def shown_messages(pks: list[int]) -> dict[int, str]:
    """The exception messages of these letters as a person may see them (secrets the
    message quotes scrubbed: letters parked before the scrub at storage hold them)."""
    letters = DeadLetter.objects.filter(pk__in=pks).only(*SCRUB_FIELDS)
    return {letter.pk: redaction.shown_letter(letter).exception_message for letter in letters}


def group_letters(fingerprint: str) -> QuerySet[DeadLetter]:
    return DeadLetter.objects.filter(fingerprint=fingerprint)


def siblings(letter: DeadLetter, limit: int = 10) -> tuple[dict[str, int], list[DeadLetter]]:
    """Counts by status of the other letters with ``letter``'s fingerprint, and the
    ``limit`` most recent of them."""
    others = group_letters(letter.fingerprint).exclude(pk=letter.pk)
    counts = dict(others.order_by().values_list("status").annotate(n=Count("pk")))
    recent = list(others.order_by("-last_failed_at")[:limit])
    return counts, recent
