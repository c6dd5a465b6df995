"""Operations on dead letters: replay (optionally with an edited payload), discard,
resolve by hand, and the same in bulk.

The one service the admin and ``manage.py dlq`` call, so every face behaves
the same and leaves the same audit trail (``DeadLetterEvent``).

A replay reuses the letter's row: status ``replaying``; the replayed run's
success marks it ``resolved`` and a new permanent failure parks it again with
the history appended. Each replay gets a fresh attempt budget (the run number
travels in the ``recovery_replay`` header). The task is republished under its
own id with an allow-list of options (:mod:`recovery.operations.replay_options`): a queue the app
knows, the priority and recovery's own saga/compensation headers; never the stored
``link``, ``link_error``, ``chain``, ``reply_to``, exchange, ``eta``/``expires`` or
other headers, which any client that can publish could have put there. A letter is
never left ``replaying`` by a replay that could not be published: it goes back to
``parked`` with the error in its audit trail.

Concurrency: every operation locks the letter's row; bulk operations take
batches with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two operators (or two
``dlq replay`` processes) on the same letters act on each letter once.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from ..events import compensation_finished, replay_finished
from ..core import headers as hdr
from ..core.kinds import FailureKind
from ..core.redaction import MASK, holds_mask
from ..core.task_modules import import_task_modules
from ..store import deferred
from ..store.deliveries import forget as forget_deliveries
from ..store.models import DeadLetter, DeadLetterEvent
from ..workflows import sagas
from .effects_rerun import mark_effects_rerun
from .replay_sender import ReplaySender
from .replay_options import (UnknownQueue, body_payload, check_queue, is_known_queue,
                             replay_options, undecodable_body)
from ..core.names import logger_for

__all__ = [
    "ReplayError",
    "apply_deferred_resolution",
    "PayloadError",
    "replay",
    "require_replayable",
    "discard",
    "resolve",
    "validate_payload",
    "bulk",
    "BulkResult",
    "mark_replay_succeeded",
    "resolve_replayed",
    "compensate",
    "compensation_name",
]

logger = logger_for(__name__)

#: letters parked before a worker decoded their body: only these keep a raw body
_RAW_BODY_KINDS = (FailureKind.POISON.value, FailureKind.TIMEOUT.value)
ACTIONABLE = (DeadLetter.Status.PARKED,)
_NOT_PUBLISHED = ("traceback", "history", "raw_body", "exception_message")


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
        import_task_modules(app)
    try:
        return app.tasks[task_name]
    except KeyError:
        raise ReplayError(
            f"task {task_name!r} is not registered in this app; deploy it, or discard the letter"
        ) from None


def _published_payload(letter: DeadLetter) -> tuple[Any, Any]:
    """The arguments a replay of ``letter`` publishes."""
    args, kwargs = letter.args, letter.kwargs
    if letter.kind in _RAW_BODY_KINDS and not args and not kwargs:
        # A message refused as too large keeps its arguments only in its body (recovery.core.bounds).
        args, kwargs = body_payload(letter.raw_body, letter.content_type) or (args, kwargs)
    return args, kwargs


def _refuse_masked(letter: DeadLetter, args: Any, kwargs: Any, verb: str = "replay") -> None:
    """A payload holding the mask (a letter imported from a masked export) is never
    published: the task would run with the mask as its secret."""
    if holds_mask(args) or holds_mask(kwargs):
        raise ReplayError(
            f"cannot {verb} letter {letter.pk}: its payload holds masked values ({MASK}), as "
            f"a letter imported from a masked export does; put the real values in with an "
            f"edited replay, or discard it")


def _signature_for(letter: DeadLetter, app: Any, queue: str | None,
                   is_known: Callable[[str], bool] | None = None) -> tuple[Any, dict]:
    """The replay's signature and headers, from the allow-list only.

    Raises:
        ReplayError: the queue (chosen, or the letter's own) is not one the app knows.
    """
    try:
        options, carried = replay_options(letter.headers, letter.queue, app, queue, is_known)
    except UnknownQueue as exc:
        raise ReplayError(f"cannot replay letter {letter.pk}: {exc}") from None
    args, kwargs = _published_payload(letter)
    signature = app.signature(letter.task_name, args=args, kwargs=kwargs, **options)
    return signature, carried


def require_replayable(letter: DeadLetter, app: Any = None, queue: str | None = None,
                       edited: bool = False,
                       is_known: Callable[[str], bool] | None = None) -> tuple[Any, dict]:
    """Refuse, before anything changes, a replay that could only fail or run the task
    with arguments it was never sent. Forms call it to say so before a payload check.
    Returns the replay's signature and headers, as it would publish them now.

    Raises:
        ReplayError: the body could not be decoded, or the payload holds masked values (and
            no edited payload replaces it), or the queue (chosen, or the letter's own) is
            not one the app knows.
    """
    app = app or current_app
    if (not edited and letter.kind in _RAW_BODY_KINDS
            and undecodable_body(letter.raw_body, letter.content_type)):
        raise ReplayError(
            f"cannot replay letter {letter.pk}: body not decodable, so its arguments are "
            f"unknown; replay it with an edited payload, or discard it")
    if not edited:
        _refuse_masked(letter, *_published_payload(letter))
    return _signature_for(letter, app, queue, is_known)


def _prepare_replay(letter: DeadLetter, *, actor: str, app: Any, queue: str | None = None,
                    args: Any = None, kwargs: Any = None, note: str = "") -> None:
    """Inside the caller's transaction, with the row locked: validate, edit, mark replaying."""
    _require_parked(letter, "replayed")
    _registered_task(letter.task_name, app)
    require_replayable(letter, app, queue, edited=args is not None or kwargs is not None)
    if args is not None or kwargs is not None:
        new_args = letter.args if args is None else args
        new_kwargs = letter.kwargs if kwargs is None else kwargs
        validate_payload(letter.task_name, new_args, new_kwargs, app)
        if holds_mask(new_args) or holds_mask(new_kwargs):
            raise PayloadError(f"the payload still holds masked values ({MASK}); type the "
                               f"real values in their place")
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
    # The deliveries that parked it (a crash loop) must not park the replay at its first loss.
    forget_deliveries([letter.task_id])


def _publish_replay(letter: DeadLetter, *, actor: str, app: Any, queue: str | None,
                    note: str = "", sender: ReplaySender | None = None,
                    events: list[DeadLetterEvent] | None = None) -> None:
    """After commit: publish; on failure put the letter back to parked, audited.

    ``sender``: publish through this batch's sender (its producer, Celery's message built
    directly where that is known to equal ``apply_async``'s) instead of ``apply_async``
    on a producer from the pool.
    ``events``: append the ``replayed`` event here for the caller to write (``bulk``
    writes one batch's events in one INSERT) instead of inserting it now.
    """
    try:
        # Inside the try: whatever fails here must put the letter back to parked.
        _refuse_masked(letter, *_published_payload(letter))
        signature, carried = (letter.__dict__.pop("_replay_signature", None)
                              or _signature_for(letter, app, queue))
        headers = {**carried, hdr.REPLAY: letter.replay_count}
        if sender is None:
            signature.apply_async(task_id=letter.task_id, headers=headers)
        else:
            sender.send(signature, letter.task_id, headers)
    except Exception as exc:
        DeadLetter.objects.filter(pk=letter.pk, status=DeadLetter.Status.REPLAYING).update(
            status=DeadLetter.Status.PARKED, replay_count=F("replay_count") - 1,
        )
        DeadLetterEvent.objects.create(
            letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAY_FAILED, actor=actor,
            note=note, outcome=f"could not publish: {exc}"[:255],
        )
        replay_finished.send(outcome="failed", count=1)
        raise ReplayError(f"could not publish the replay of letter {letter.pk}: {exc}") from exc
    replay_finished.send(outcome="published", count=1)
    event = DeadLetterEvent(  # ``at`` is now: the time of the publish, even if written later
        letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAYED, actor=actor, note=note,
        outcome=f"replay {letter.replay_count} published to "
                f"{queue or letter.queue or 'its original queue'}"[:255],
    )
    if events is None:
        event.save(force_insert=True)
    else:
        events.append(event)


def replay(letter: DeadLetter | int, *, actor: str = "system", queue: str | None = None,
           args: Any = None, kwargs: Any = None, note: str = "", app: Any = None,
           rerun_effects: bool = False) -> DeadLetter:
    """Republish a parked letter (with an edited payload when ``args``/``kwargs`` are given).

    ``rerun_effects``: run the effects its task already committed (``self.effect``) again,
    instead of skipping them; audited (:mod:`recovery.operations.effects_rerun`).

    Raises:
        ReplayError: the letter is not parked, its task is not registered, the queue is
            not one the app knows, its body could not be decoded (and no payload is
            given), or the publish failed (the letter is then parked again).
        PayloadError: the edited payload does not fit the task; nothing changed.
    """
    app = app or current_app
    with transaction.atomic():
        locked = _lock(letter)
        if rerun_effects:
            _require_parked(locked, "replayed")
            mark_effects_rerun(locked, actor=actor, note=note)
        _prepare_replay(locked, actor=actor, app=app, queue=queue, args=args, kwargs=kwargs,
                        note=note)
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

    A replay batch costs a handful of statements, not a few per letter: the locked
    letters are marked ``replaying`` in one UPDATE, published on one producer, and
    their ``replayed`` events (each stamped with its publish time) are written in one
    INSERT after the batch, or before each wait when ``rate`` throttles; an interrupted
    run still writes the events of what it published (a SIGKILL loses those of at most
    the current batch).

    Args:
        rate: at most this many letters per second (SQS redrive's velocity), or None.
        progress: called after each batch with the running totals.
    """
    if operation not in ("replay", "discard", "resolve", "compensate"):
        raise ValueError(f"unknown operation {operation!r}")
    closing = {
        "discard": (DeadLetter.Status.DISCARDED, DeadLetterEvent.Action.DISCARDED),
        "resolve": (DeadLetter.Status.RESOLVED, DeadLetterEvent.Action.RESOLVED),
    }
    app = app or current_app
    if operation == "replay" and queue:
        try:
            check_queue(queue, app)
        except UnknownQueue as exc:
            raise ReplayError(str(exc)) from None
    result = BulkResult()
    started = time.monotonic()
    last_pk = 0
    known_tasks: dict[str, ReplayError | None] = {}
    if operation == "replay":
        # A replay reads only what it publishes; the diagnostics stay in the table.
        queryset = queryset.defer(*_NOT_PUBLISHED)
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
            if operation == "replay":
                prepared = _prepare_replays(batch, result, app=app, queue=queue,
                                            known_tasks=known_tasks)
            else:
                for letter in batch:
                    try:
                        with transaction.atomic():
                            if operation == "compensate":
                                if _compensate_saga(letter, actor=actor, note=note):
                                    result.done += 1
                                    continue
                                _prepare_compensation(letter, app=app)
                                prepared.append(letter)
                                continue
                            status, action = closing[operation]
                            _close_locked(letter, status, action, actor=actor, note=note)
                            result.done += 1
                    except ReplayError as exc:
                        result.failed += 1
                        result.errors.append(f"letter {letter.pk}: {exc}")
        # Committed: now publish, outside any lock, at the requested velocity.
        pending = deque(prepared)
        events: list[DeadLetterEvent] = []
        try:
            if operation == "replay" and not rate:
                _publish_replays_batched(pending, result, events, actor=actor, app=app,
                                         queue=queue, note=note)
            while pending:
                # One producer (one broker connection) for the batch; a fresh one after a
                # failed publish, in case that connection is what failed.
                with app.producer_or_acquire() as producer:
                    sender = ReplaySender(app, producer)
                    while pending:
                        letter = pending[0]
                        if rate:
                            ahead = (result.done + result.failed) / rate - (time.monotonic() - started)
                            if ahead > 0:
                                _write_events(events)  # the wait pays for keeping the trail current
                                time.sleep(ahead)
                        try:
                            if operation == "compensate":
                                _publish_compensation(letter, actor=actor, app=app, note=note,
                                                      producer=producer)
                            else:
                                _publish_replay(letter, actor=actor, app=app, queue=queue,
                                                note=note, sender=sender, events=events)
                        except ReplayError as exc:
                            result.failed += 1
                            result.errors.append(f"letter {letter.pk}: {exc}")
                            pending.popleft()
                            break
                        result.done += 1
                        pending.popleft()
        finally:
            # Interrupted (Ctrl-C, an error): letters marked replaying but never published
            # go back to parked, so running the same command again picks them up; those
            # that were published keep their audit events.
            try:
                if pending:
                    _unprepare(list(pending), operation)
            finally:
                _write_events(events)
        if progress is not None:
            progress(result)
    return result


#: Redis commands a batch may buffer before kombu flushes it on its own: more than any
#: batch needs (a message is one LPUSH, a fanout one PUBLISH), so the only flush is ours.
_BUFFER_PER_LETTER = 4


def _publish_replays_batched(pending: deque, result: BulkResult,
                             events: list[DeadLetterEvent], *, actor: str, app: Any,
                             queue: str | None, note: str) -> None:
    """Publish a replay batch as one round trip where the transport can (kombu's Redis
    publish batch: one non-transactional pipeline); elsewhere kombu publishes each message
    at once, as before. Takes what it published off ``pending``.

    A letter that cannot be published (a masked payload, an unknown queue) is parked
    again by ``_publish_replay`` and counted, the rest go on. If the flush itself fails,
    the broker may hold some of the batch's messages and not others, and nothing tells
    which: those letters stay ``replaying`` with an event saying so. A run that succeeds
    resolves its letter; one that never runs is parked again by the watchdog
    (``REPLAYING_AFTER_SECONDS``, a ``replay_lost`` event), whose late-success rule then
    still resolves it if the message was only slow. Nothing is replayed twice by us, and
    nothing is called published that was not.
    """
    buffered: list[DeadLetter] = []
    buffered_events: list[DeadLetterEvent] = []
    flushing = False
    with app.producer_or_acquire() as producer:
        sender = ReplaySender(app, producer)
        try:
            with producer.batch(max_size=_BUFFER_PER_LETTER * len(pending) + 8):
                while pending:
                    letter = pending[0]
                    try:
                        _publish_replay(letter, actor=actor, app=app, queue=queue, note=note,
                                        sender=sender, events=buffered_events)
                    except ReplayError as exc:
                        result.failed += 1
                        result.errors.append(f"letter {letter.pk}: {exc}")
                        pending.popleft()
                        continue
                    buffered.append(pending.popleft())
                flushing = True  # leaving the block sends the buffer
        except BaseException as exc:
            if not flushing:
                # Interrupted while buffering: kombu discarded the buffer, nothing was sent;
                # the caller puts these back to parked with the rest.
                pending.extendleft(reversed(buffered))
                raise
            events.extend(_uncertain(buffered, actor=actor, note=note, error=exc))
            result.failed += len(buffered)
            result.errors.extend(f"letter {letter.pk}: publish uncertain ({exc})"
                                 for letter in buffered)
            return
    result.done += len(buffered)
    events.extend(buffered_events)


def _uncertain(letters: list[DeadLetter], *, actor: str, note: str,
               error: BaseException) -> list[DeadLetterEvent]:
    """The audit events of letters whose messages the broker may or may not hold."""
    logger.error("recovery: the broker failed while taking a batch of %d replays (%s); they "
                 "stay replaying: those that run resolve themselves, the watchdog parks the "
                 "others again after REPLAYING_AFTER_SECONDS", len(letters), error)
    return [DeadLetterEvent(
        letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAYED, actor=actor, note=note,
        outcome=f"replay {letter.replay_count} publish uncertain: the broker failed taking "
                f"its batch ({error}); if it never runs, the watchdog parks it again"[:255],
    ) for letter in letters]


def _prepare_replays(batch: list[DeadLetter], result: BulkResult, *, app: Any,
                     queue: str | None,
                     known_tasks: dict[str, ReplayError | None]) -> list[DeadLetter]:
    """Inside the batch's transaction, rows locked: what ``_prepare_replay`` does to one
    letter (without an edit), for the whole batch in one UPDATE. Returns the letters to
    publish; the others are counted as failed."""
    prepared = []
    is_known = functools.lru_cache(maxsize=None)(lambda name: is_known_queue(name, app))
    for letter in batch:
        try:
            _require_parked(letter, "replayed")
            if letter.task_name not in known_tasks:
                try:
                    _registered_task(letter.task_name, app)
                    known_tasks[letter.task_name] = None
                except ReplayError as exc:
                    known_tasks[letter.task_name] = exc
            if known_tasks[letter.task_name] is not None:
                raise known_tasks[letter.task_name]
            # Built once: the publish after the commit takes it instead of building again.
            letter.__dict__["_replay_signature"] = require_replayable(letter, app, queue,
                                                                     is_known=is_known)
        except ReplayError as exc:
            result.failed += 1
            result.errors.append(f"letter {letter.pk}: {exc}")
            continue
        prepared.append(letter)
    if prepared:
        now = timezone.now()
        DeadLetter.objects.filter(pk__in=[letter.pk for letter in prepared]).update(
            status=DeadLetter.Status.REPLAYING, replay_count=F("replay_count") + 1, updated_at=now,
        )
        for letter in prepared:
            letter.status = DeadLetter.Status.REPLAYING
            letter.replay_count += 1
            letter.updated_at = now
        forget_deliveries([letter.task_id for letter in prepared])
    return prepared


def _write_events(events: list[DeadLetterEvent]) -> None:
    if events:
        DeadLetterEvent.objects.bulk_create(events)
        events.clear()


def _unprepare(letters: list[DeadLetter], operation: str = "replay") -> None:
    if operation == "compensate":
        DeadLetter.objects.filter(
            pk__in=[letter.pk for letter in letters], status=DeadLetter.Status.COMPENSATED,
        ).update(status=DeadLetter.Status.PARKED)
        return
    DeadLetter.objects.filter(
        pk__in=[letter.pk for letter in letters], status=DeadLetter.Status.REPLAYING,
    ).update(status=DeadLetter.Status.PARKED, replay_count=F("replay_count") - 1)


def resolve_replayed(task_id: str, request: Any, **_: Any) -> None:
    """On ``task_succeeded``: a replayed run succeeded, so its letter is resolved.

    The body has run: the resolution must not be lost. If the database refuses (after
    one retry on a fresh connection) it is spooled and the drain applies it.
    """
    if not hdr.read(request, hdr.REPLAY):
        return
    try:
        deferred.write_or_defer(deferred.REPLAY_SUCCEEDED,
                                lambda: mark_replay_succeeded(task_id), task_id=task_id)
    except OSError as spool_exc:
        logger.critical("recovery: replay of %s succeeded but its letter could not be marked "
                        "resolved (%s) nor spooled (%s); resolve it by hand", task_id,
                        spool_exc.__cause__, spool_exc)


def apply_deferred_resolution(data: dict, backend: Any) -> None:
    """Apply a spooled ``replay_succeeded`` record (:mod:`recovery.store.deferred`);
    registered by :mod:`recovery.subscriptions`."""
    mark_replay_succeeded(data["task_id"])



def mark_replay_succeeded(task_id: str) -> int:
    """Resolve the letter ``task_id`` was replayed from; its replayed run succeeded.

    Also resolves a letter the watchdog gave up for lost (parked again with a
    ``replay_lost`` event, nothing since): its replay was only late, queued behind a
    backlog or unseen by a busy worker, and an operator must not replay it twice.
    """
    now = timezone.now()
    resolved = DeadLetter.objects.filter(
        task_id=task_id, status=DeadLetter.Status.REPLAYING,
    ).update(status=DeadLetter.Status.RESOLVED, updated_at=now)
    if not resolved:
        resolved = _resolve_late_replay(task_id, now)
    replay_finished.send_on_commit(outcome="resolved", count=resolved)
    return resolved


def _resolve_late_replay(task_id: str, now) -> int:
    with transaction.atomic():
        letter = (DeadLetter.objects.select_for_update()
                  .filter(task_id=task_id, status=DeadLetter.Status.PARKED).first())
        if letter is None:
            return 0
        # A reveal only read the letter: it is not something that happened to it.
        last = (letter.events.exclude(action=DeadLetterEvent.Action.REVEALED)
                .order_by("-at", "-pk").first())
        if (last is None or last.action != DeadLetterEvent.Action.REPLAY_LOST
                or letter.last_failed_at > last.at):
            return 0  # parked for a reason of its own since
        DeadLetter.objects.filter(pk=letter.pk).update(status=DeadLetter.Status.RESOLVED,
                                                        updated_at=now)
        DeadLetterEvent.objects.create(
            letter_id=letter.pk, action=DeadLetterEvent.Action.REPLAYED, actor="system",
            outcome="the replay the watchdog gave up for lost reported back: it succeeded; "
                    "resolved")
    return 1


# -- compensation ---------------------------------------------------------------------------


def compensation_name(task_name: str, app: Any = None) -> str | None:
    """The name of the task that undoes ``task_name`` (its ``compensate=`` option), or None."""
    task = _registered_task(task_name, app or current_app)
    declared = getattr(task, "compensate", None)
    if declared is None or declared == "":
        return None
    return declared if isinstance(declared, str) else getattr(declared, "name", None)


def compensation_task_id(letter: DeadLetter) -> str:
    """Stable per letter, so a compensation redelivered or re-run has the same id
    (a compensation task can use ``self.request.id`` as its idempotency key)."""
    return f"{letter.task_id}.compensation"


def _prepare_compensation(letter: DeadLetter, *, app: Any) -> str:
    """Inside the caller's transaction, with the row locked: check, mark compensated."""
    _require_parked(letter, "compensated")
    name = compensation_name(letter.task_name, app)
    if name is None:
        raise ReplayError(
            f"task {letter.task_name!r} declares no compensation; declare one with "
            f"compensate='<task name>' on the task, or discard or resolve the letter"
        )
    _refuse_masked(letter, letter.args, letter.kwargs, "compensate")
    try:
        validate_payload(name, letter.args, letter.kwargs, app)
    except PayloadError as exc:
        raise ReplayError(f"the compensation {name} cannot take this letter's payload: {exc}") \
            from None
    except ReplayError:
        raise ReplayError(
            f"the compensation {name!r} of {letter.task_name!r} is not registered in this app"
        ) from None
    letter.status = DeadLetter.Status.COMPENSATED
    letter.save(update_fields=["status", "updated_at"])
    return name


def _publish_compensation(letter: DeadLetter, *, actor: str, app: Any, note: str = "",
                          producer: Any = None) -> None:
    """After commit: publish the compensation; on failure put the letter back to parked."""
    name = compensation_name(letter.task_name, app)
    task_id = compensation_task_id(letter)
    publish_options = {} if producer is None else {"producer": producer}
    try:
        app.signature(name, args=letter.args, kwargs=letter.kwargs).apply_async(
            task_id=task_id, headers={hdr.COMPENSATES: letter.task_id}, **publish_options,
        )
    except Exception as exc:
        DeadLetter.objects.filter(pk=letter.pk, status=DeadLetter.Status.COMPENSATED).update(
            status=DeadLetter.Status.PARKED)
        DeadLetterEvent.objects.create(
            letter_id=letter.pk, action=DeadLetterEvent.Action.COMPENSATE_FAILED, actor=actor,
            note=note, outcome=f"could not publish {name}: {exc}"[:255],
        )
        compensation_finished.send(outcome="publish_failed")
        raise ReplayError(
            f"could not publish the compensation of letter {letter.pk}: {exc}") from exc
    compensation_finished.send(outcome="published")
    DeadLetterEvent.objects.create(
        letter_id=letter.pk, action=DeadLetterEvent.Action.COMPENSATED, actor=actor, note=note,
        outcome=f"{name} published as {task_id}"[:255],
    )


def _compensate_saga(letter: DeadLetter, *, actor: str, note: str) -> bool:
    """With the row locked: a saga step's letter compensates its saga run instead
    (``recovery.workflows.sagas.compensate_letter``), the letter closed as compensated. False if
    the letter is not a saga's."""
    if sagas.saga_of_letter(letter) is None:
        return False
    _require_parked(letter, "compensated")
    try:
        sagas.compensate_letter(letter, actor=actor, note=note)
    except sagas.SagaError as exc:
        raise ReplayError(str(exc)) from None
    return True


def compensate(letter: DeadLetter | int, *, actor: str = "system", note: str = "",
               app: Any = None) -> DeadLetter:
    """Undo a parked letter's partial effects: run its task's compensation with the
    letter's payload, and mark the letter ``compensated``.

    The compensation is an ordinary task (a RecoveryTask retries and parks it like any
    other), published under the id ``<task id>.compensation`` with the header
    ``recovery_compensates`` naming the letter's task id.

    The letter of a saga step (or compensation) compensates its saga run instead: the
    run's completed steps are undone in reverse order (``recovery.workflows.sagas``).

    Raises:
        ReplayError: the letter is not parked, its task declares no compensation, the
            compensation is not registered or does not take the payload, or the publish
            failed (the letter is then parked again).
    """
    app = app or current_app
    with transaction.atomic():
        locked = _lock(letter)
        if _compensate_saga(locked, actor=actor, note=note):
            return locked
        _prepare_compensation(locked, app=app)
    _publish_compensation(locked, actor=actor, app=app, note=note)
    locked.refresh_from_db()
    return locked
