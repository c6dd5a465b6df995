"""Replay a dead letter: republish it under its own task id, workflow options restored.

The one service the admin and ``manage.py dlq`` call. A replay reuses the
letter's row: status ``replaying``; the replayed run's success marks it
``resolved`` and a new permanent failure parks it again with the history
appended. Each replay gets a fresh attempt budget (the run number travels
in the ``recovery_replay`` header).
"""

from __future__ import annotations

from typing import Any

from celery import current_app
from django.db import transaction
from django.db.models import F

from . import headers as hdr
from .models import DeadLetter

__all__ = ["replay", "mark_replay_succeeded", "ReplayError"]

_DROPPED_OPTIONS = ("eta", "countdown", "expires", "task_id", "retries", "headers")


class ReplayError(Exception):
    """A letter cannot be replayed as it is; the message says why."""


def replay(letter: DeadLetter | int, *, queue: str | None = None, app: Any = None) -> DeadLetter:
    """Republish ``letter`` and mark it ``replaying``. Raises ReplayError if it cannot run."""
    app = app or current_app
    with transaction.atomic():
        pk = letter.pk if isinstance(letter, DeadLetter) else letter
        letter = DeadLetter.objects.select_for_update().get(pk=pk)
        if letter.status not in (DeadLetter.Status.PARKED,):
            raise ReplayError(f"letter {letter.pk} is {letter.status}, only parked letters replay")
        if letter.task_name not in app.tasks:
            raise ReplayError(
                f"task {letter.task_name!r} is not registered in this app; deploy it or discard "
                "the letter"
            )
        options = {k: v for k, v in (letter.headers or {}).items() if k not in _DROPPED_OPTIONS}
        custom = {k: v for k, v in ((letter.headers or {}).get("headers") or {}).items()
                  if k not in hdr.OURS}
        replay_number = letter.replay_count + 1
        if queue:
            options["queue"] = queue
            options.pop("routing_key", None)
            options.pop("exchange", None)
        DeadLetter.objects.filter(pk=letter.pk).update(
            status=DeadLetter.Status.REPLAYING, replay_count=F("replay_count") + 1,
        )
    # Publish after the commit, so the replayed run never sees the letter still parked.
    signature = app.signature(letter.task_name, args=letter.args, kwargs=letter.kwargs, **options)
    try:
        signature.apply_async(task_id=letter.task_id, headers={**custom, hdr.REPLAY: replay_number})
    except Exception as exc:
        DeadLetter.objects.filter(pk=letter.pk, status=DeadLetter.Status.REPLAYING).update(
            status=DeadLetter.Status.PARKED, replay_count=F("replay_count") - 1,
        )
        raise ReplayError(f"could not publish the replay of letter {letter.pk}: {exc}") from exc
    letter.refresh_from_db()
    return letter


def mark_replay_succeeded(task_id: str) -> int:
    """Called by RecoveryTask when a replayed run succeeds."""
    return DeadLetter.objects.filter(
        task_id=task_id, status=DeadLetter.Status.REPLAYING,
    ).update(status=DeadLetter.Status.RESOLVED)
