"""Operations on dead letters: replay (optionally with an edited payload), discard,
resolve by hand, and the same in bulk.

The one service the admin and ``manage.py dlq`` call, so every face behaves
the same and leaves the same audit trail (``DeadLetterEvent``).

A replay reuses the letter's row: status ``replaying``; the replayed run's
success marks it ``resolved`` and a new permanent failure parks it again with
the history appended. Each replay gets a fresh attempt budget (the run number
travels in the ``recovery_replay`` header). The task is republished under its
own id with the stored workflow options (chain, link, chord), never its old
``eta``/``expires``.

Concurrency: every operation locks the letter's row; bulk operations take
batches with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two operators (or two
``dlq replay`` processes) on the same letters act on each letter once.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.db import transaction
from django.db.models import F, QuerySet

from . import headers as hdr
from .models import DeadLetter, DeadLetterEvent

__all__ = [
    "ReplayError",
    "PayloadError",
    "replay",
    "discard",
    "resolve",
    "validate_payload",
    "bulk",
    "BulkResult",
    "mark_replay_succeeded",
]

_DROPPED_OPTIONS = ("eta", "countdown", "expires", "task_id", "retries", "headers")
ACTIONABLE = (DeadLetter.Status.PARKED,)


class ReplayError(Exception):
    """A letter cannot be acted on as it is; the message says why and what to do."""


class PayloadError(ReplayError):
    """An edited payload is not valid for the task; nothing was changed."""


def _lock(letter: DeadLetter | int) -> DeadLetter:
    pk = letter.pk if isinstance(letter, DeadLetter) else letter
    try:
        return DeadLetter.objects.select_for_update().get(pk=pk)
    except DeadLetter.DoesNotExist:
        raise ReplayError(f"no dead letter with id {pk}") from None


def _require_parked(letter: DeadLetter, verb: str) -> None:
    if letter.status not in ACTIONABLE:
        raise ReplayError(
            f"letter {letter.pk} is {letter.status}; only parked letters can be {verb}"
        )


def validate_payload(task_name: str, args: Any, kwargs: Any, app: Any = None) -> None:
    """Check an edited payload before anything is saved.

    Raises:
        PayloadError: args is not a list, kwargs not an object, the task is unknown,
            or the arguments do not bind to the task's signature.
    """
    app = app or current_app
    if not isinstance(args, list):
        raise PayloadError(f"args must be a JSON list, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise PayloadError(f"kwargs must be a JSON object, not {type(kwargs).__name__}")
    task = _registered_task(task_name, app)
    run = getattr(task, "_orig_run", None) or task.run
    signature = inspect.signature(run)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise PayloadError(f"arguments do not fit {task_name}{signature}: {exc}") from None


def _registered_task(task_name: str, app: Any) -> Any:
    if task_name not in app.tasks:
        # Outside a worker (admin, manage.py) task modules are imported lazily: load them
        # the way a worker does before declaring a task unknown.
        app.loader.import_default_modules()
    try:
        return app.tasks[task_name]
    except KeyError:
        raise ReplayError(
            f"task {task_name!r} is not registered in this app; deploy it, or discard the letter"
        ) from None


def _signature_for(letter: DeadLetter, app: Any, queue: str | None) -> tuple[Any, dict]:
    options = {k: v for k, v in (letter.headers or {}).items() if k not in _DROPPED_OPTIONS}
    custom = {k: v for k, v in ((letter.headers or {}).get("headers") or {}).items()
              if k not in hdr.OURS}
    if queue:
        options["queue"] = queue
        options.pop("routing_key", None)
        options.pop("exchange", None)
    signature = app.signature(letter.task_name, args=letter.args, kwargs=letter.kwargs, **options)
    return signature, custom


def _prepare_replay(letter: DeadLetter, *, actor: str, app: Any, args: Any = None,
                    kwargs: Any = None, note: str = "") -> None:
    """Inside the caller's transaction, with the row locked: validate, edit, mark replaying."""
    _require_parked(letter, "replayed")
    _registered_task(letter.task_name, app)
    if args is not None or kwargs is not None:
        new_args = letter.args if args is None else args
        new_kwargs = letter.kwargs if kwargs is None else kwargs
        validate_payload(letter.task_name, new_args, new_kwargs, app)
        if (new_args, new_kwargs) != (letter.args, letter.kwargs):
            DeadLetterEvent.objects.create(
                letter=letter, action=DeadLetterEvent.Action.EDITED, actor=actor, note=note,
                before={"args": letter.args, "kwargs": letter.kwargs},
                after={"args": new_args, "kwargs": new_kwargs},
            )
            letter.args, letter.kwargs = new_args, new_kwargs
    letter.status = DeadLetter.Status.REPLAYING
    letter.replay_count += 1
    letter.save(update_fields=["args", "kwargs", "status", "replay_count", "updated_at"])


def _publish_replay(letter: DeadLetter, *, actor: str, app: Any, queue: str | None,
                    note: str = "") -> None:
    """After commit: publish; on failure put the letter back to parked, audited."""
    signature, custom = _signature_for(letter, app, queue)
    try:
        signature.apply_async(task_id=letter.task_id,
                              headers={**custom, hdr.REPLAY: letter.replay_count})
    except Exception as exc:
        DeadLetter.objects.filter(pk=letter.pk, status=DeadLetter.Status.REPLAYING).update(
            status=DeadLetter.Status.PARKED, replay_count=F("replay_count") - 1,
        )
        DeadLetterEvent.objects.create(
            letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAY_FAILED, actor=actor,
            note=note, outcome=f"could not publish: {exc}"[:255],
        )
        raise ReplayError(f"could not publish the replay of letter {letter.pk}: {exc}") from exc
    DeadLetterEvent.objects.create(
        letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAYED, actor=actor, note=note,
        outcome=f"replay {letter.replay_count} published to "
                f"{queue or letter.queue or 'its original queue'}"[:255],
    )


def replay(letter: DeadLetter | int, *, actor: str = "system", queue: str | None = None,
           args: Any = None, kwargs: Any = None, note: str = "", app: Any = None) -> DeadLetter:
    """Republish a parked letter (with an edited payload when ``args``/``kwargs`` are given).

    Raises:
        ReplayError: the letter is not parked, its task is not registered, or the
            publish failed (the letter is then parked again).
        PayloadError: the edited payload does not fit the task; nothing changed.
    """
    app = app or current_app
    with transaction.atomic():
        locked = _lock(letter)
        _prepare_replay(locked, actor=actor, app=app, args=args, kwargs=kwargs, note=note)
    # Publish after the commit, so the replayed run never sees the letter still parked.
    _publish_replay(locked, actor=actor, app=app, queue=queue, note=note)
    locked.refresh_from_db()
    return locked


def _close_locked(letter: DeadLetter, status: str, action: str, *, actor: str,
                  note: str) -> None:
    """With the row locked: move a parked letter to ``status`` and audit it."""
    letter.status = status
    letter.save(update_fields=["status", "updated_at"])
    DeadLetterEvent.objects.create(letter=letter, action=action, actor=actor, note=note)


def _close(letter: DeadLetter | int, status: str, action: str, *, actor: str, note: str,
           verb: str) -> DeadLetter:
    with transaction.atomic():
        locked = _lock(letter)
        _require_parked(locked, verb)
        _close_locked(locked, status, action, actor=actor, note=note)
    return locked


def discard(letter: DeadLetter | int, *, actor: str = "system", note: str = "") -> DeadLetter:
    """Give up on a parked letter on purpose (the row stays, for the record)."""
    return _close(letter, DeadLetter.Status.DISCARDED, DeadLetterEvent.Action.DISCARDED,
                  actor=actor, note=note, verb="discarded")


def resolve(letter: DeadLetter | int, *, actor: str = "system", note: str = "") -> DeadLetter:
    """Mark a parked letter resolved by hand (the work was done some other way)."""
    return _close(letter, DeadLetter.Status.RESOLVED, DeadLetterEvent.Action.RESOLVED,
                  actor=actor, note=note, verb="resolved")


@dataclass
class BulkResult:
    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def bulk(operation: str, queryset: QuerySet, *, actor: str, batch_size: int = 500,
         rate: float | None = None, queue: str | None = None, note: str = "",
         progress: Callable[[BulkResult], None] | None = None, app: Any = None) -> BulkResult:
    """Apply ``replay``, ``discard`` or ``resolve`` to every parked letter of ``queryset``.

    Streams in id order, one batch in memory at a time; each batch is locked with
    ``SELECT ... FOR UPDATE SKIP LOCKED`` and committed on its own, so a concurrent run
    skips what this one holds. An interrupted run puts the letters it had not published
    yet back to parked, so it can simply be started again (a run killed with SIGKILL
    between commit and publish leaves up to one batch ``replaying``: keep
    ``batch_size`` small with a low ``rate``).

    Args:
        rate: at most this many letters per second (SQS redrive's velocity), or None.
        progress: called after each batch with the running totals.
    """
    if operation not in ("replay", "discard", "resolve"):
        raise ValueError(f"unknown operation {operation!r}")
    closing = {
        "discard": (DeadLetter.Status.DISCARDED, DeadLetterEvent.Action.DISCARDED),
        "resolve": (DeadLetter.Status.RESOLVED, DeadLetterEvent.Action.RESOLVED),
    }
    app = app or current_app
    result = BulkResult()
    started = time.monotonic()
    last_pk = 0
    while True:
        prepared: list[DeadLetter] = []
        with transaction.atomic():
            batch = list(
                queryset.filter(status__in=ACTIONABLE, pk__gt=last_pk)
                .select_for_update(skip_locked=True)
                .order_by("pk")[:batch_size]
            )
            if not batch:
                break
            last_pk = batch[-1].pk
            for letter in batch:
                try:
                    with transaction.atomic():
                        if operation == "replay":
                            _prepare_replay(letter, actor=actor, app=app, note=note)
                            prepared.append(letter)
                            continue
                        status, action = closing[operation]
                        _close_locked(letter, status, action, actor=actor, note=note)
                        result.done += 1
                except ReplayError as exc:
                    result.failed += 1
                    result.errors.append(f"letter {letter.pk}: {exc}")
        # Committed: now publish, outside any lock, at the requested velocity.
        pending = list(prepared)
        try:
            while pending:
                letter = pending[0]
                if rate:
                    ahead = (result.done + result.failed) / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                try:
                    _publish_replay(letter, actor=actor, app=app, queue=queue, note=note)
                    result.done += 1
                except ReplayError as exc:
                    result.failed += 1
                    result.errors.append(f"letter {letter.pk}: {exc}")
                pending.pop(0)
        finally:
            # Interrupted (Ctrl-C, an error): letters marked replaying but never published
            # go back to parked, so running the same command again picks them up.
            if pending:
                _unprepare(pending)
        if progress is not None:
            progress(result)
    return result


def _unprepare(letters: list[DeadLetter]) -> None:
    for letter in letters:
        DeadLetter.objects.filter(pk=letter.pk, status=DeadLetter.Status.REPLAYING).update(
            status=DeadLetter.Status.PARKED, replay_count=F("replay_count") - 1,
        )


def mark_replay_succeeded(task_id: str) -> int:
    """Called by RecoveryTask when a replayed run succeeds."""
    return DeadLetter.objects.filter(
        task_id=task_id, status=DeadLetter.Status.REPLAYING,
    ).update(status=DeadLetter.Status.RESOLVED)
