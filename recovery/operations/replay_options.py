"""What a replay may take from a stored letter: an allow-list, never the stored options.

A letter's ``headers`` hold what its message carried, and a message is input: any client
that can publish can put ``link``, ``link_error``, ``chain``, ``reply_to``, a foreign
``exchange`` or arbitrary headers in it. Replaying those would run tasks nobody chose
(a linked task with the attacker's arguments), send results to another queue, or drop
the replay into an exchange no worker reads. So a replay takes only:

* the queue: the operator's choice or the queue the letter was parked from, and either
  must be one this app knows (:func:`known_queues`); published by queue name, so the
  exchange and routing key are the app's own for that queue;
* the priority, when it is a valid AMQP priority (0-255);
* recovery's own headers the next run needs (:data:`CARRIED_FROM_LETTER`: the saga step
  and the task a compensation compensates), each only when it has the expected shape.

The countdown is never taken from a letter: a replay runs now. Letters parked before a
worker could read their body (poison) cannot be replayed from the body: the refusal
says so (:func:`undecodable_body`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core import deepjson, headers as hdr
from ..core.names import logger_for

__all__ = ["UnknownQueue", "known_queues", "consumed_queues", "is_known_queue", "check_queue",
           "replay_options", "body_payload",
           "undecodable_body", "CARRIED_FROM_LETTER"]

#: recovery headers a replay carries over from the letter (the rest are set afresh)
CARRIED_FROM_LETTER = (hdr.COMPENSATES, hdr.SAGA, hdr.EFFECTS_GENERATION)

_MAX_PRIORITY = 255


logger = logger_for(__name__)

#: How long the answer to "which queues do live workers consume?" is reused: one broadcast
#: per window, however many letters a bulk replay checks. An empty answer (no worker
#: answered) is reused for a shorter time, so a worker that starts is seen soon.
CONSUMED_QUEUES_CACHE_SECONDS = 30.0
_EMPTY_CACHE_SECONDS = 5.0
#: How long the broadcast waits for workers to answer.
INSPECT_TIMEOUT_SECONDS = 1.0
_consumed: dict[int, tuple[float, frozenset[str]]] = {}


class UnknownQueue(ValueError):
    """A replay was asked to publish to a queue this app does not know."""


def _queue_names(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        # task_queues as {name: options}, or a route as {"queue": name | Queue}
        queue = value.get("queue")
        if queue is not None:
            yield from _queue_names(queue)
    elif getattr(value, "name", None):
        yield value.name  # a kombu Queue


def known_queues(app: Any) -> frozenset[str]:
    """The queues a replay may publish to: the default queue, ``task_queues`` and the
    queues named by ``task_routes`` (mapping routes; a router function is not asked)."""
    conf = app.conf
    names = {conf.task_default_queue}
    queues = conf.task_queues or ()
    if isinstance(queues, Mapping):
        names.update(str(name) for name in queues)
    else:
        for queue in queues:
            names.update(_queue_names(queue))
    routes = conf.task_routes or ()
    for router in ([routes] if isinstance(routes, Mapping) else routes):
        if isinstance(router, Mapping):
            for route in router.values():
                names.update(_queue_names(route))
    return frozenset(name for name in names if name)


def consumed_queues(app: Any) -> frozenset[str]:
    """The queues live workers consume, asked over the broker (``active_queues``) and
    cached briefly. A worker started with ``-Q reports`` consumes a queue no setting
    declares (Celery creates missing queues): a letter parked from it must replay there."""
    now = time.monotonic()
    cached = _consumed.get(id(app))
    if cached is not None and now < cached[0]:
        return cached[1]
    try:
        replies = app.control.inspect(timeout=INSPECT_TIMEOUT_SECONDS).active_queues() or {}
    except Exception:  # noqa: BLE001 - a broker that cannot be asked knows no extra queue
        logger.warning("recovery: cannot ask the workers which queues they consume",
                       exc_info=True)
        replies = {}
    names = frozenset(
        queue["name"] for queues in replies.values() if isinstance(queues, list)
        for queue in queues if isinstance(queue, Mapping) and isinstance(queue.get("name"), str))
    ttl = CONSUMED_QUEUES_CACHE_SECONDS if names else _EMPTY_CACHE_SECONDS
    _consumed[id(app)] = (now + ttl, names)
    return names


def is_known_queue(queue: str, app: Any) -> bool:
    """Whether a replay may publish to ``queue``: one the app declares or routes to, or
    one a live worker consumes (asked only when the settings do not name it)."""
    return queue in known_queues(app) or queue in consumed_queues(app)


def check_queue(queue: str, app: Any) -> str:
    """``queue`` if this app knows it.

    Raises:
        UnknownQueue: it names a queue no setting declares or routes to and no live
            worker consumes.
    """
    if not is_known_queue(queue, app):
        known = known_queues(app) | consumed_queues(app)
        raise UnknownQueue(
            f"queue {queue!r} is not one this app declares or routes to, nor one a live "
            f"worker consumes (known: {', '.join(sorted(known))}); name one of those"
        )
    return queue


def _priority(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= _MAX_PRIORITY else None


def _carried_header(name: str, value: Any) -> Any:
    if name == hdr.SAGA:
        return dict(value) if isinstance(value, Mapping) else None
    if name == hdr.EFFECTS_GENERATION:
        # 0 is the default every run assumes: carrying it would only lengthen the message.
        return value if type(value) is int and value > 0 else None
    return value if isinstance(value, str) and value else None


def replay_options(stored: Any, origin_queue: str, app: Any,
                   queue: str | None = None,
                   is_known: Callable[[str], bool] | None = None) -> tuple[dict, dict]:
    """``(publish options, headers)`` for replaying a letter.

    Args:
        stored: the letter's ``headers`` (its stored execution options).
        origin_queue: the queue the letter was parked from (``letter.queue``).
        queue: the operator's choice, or None for the origin queue.
        is_known: :func:`is_known_queue` for ``app``, memoised by a caller that checks
            many letters (reading the settings costs more than the rest of this).

    Raises:
        UnknownQueue: the chosen queue, or the origin queue when none is chosen, is not
            one this app knows.
    """
    is_known = is_known or (lambda name: is_known_queue(name, app))
    options: dict[str, Any] = {}
    if queue:
        options["queue"] = queue if is_known(queue) else check_queue(queue, app)
    elif origin_queue:
        if not is_known(origin_queue):
            raise UnknownQueue(
                f"the letter was parked from queue {origin_queue!r}, which this app neither "
                f"declares nor routes to, and no live worker consumes; replay it to a queue "
                f"the app knows")
        options["queue"] = origin_queue
    priority = _priority(stored.get("priority")) if isinstance(stored, Mapping) else None
    if priority is not None:
        options["priority"] = priority
    headers = {}
    for name in CARRIED_FROM_LETTER:
        value = _carried_header(name, hdr.from_options(stored, name))
        if value is not None:
            headers[name] = value
    return options, headers


def body_payload(raw_body: str, content_type: str) -> tuple[list, dict] | None:
    """``(args, kwargs)`` of a letter's raw body (kept for poison letters) when it is a
    JSON ``[args, kwargs, embed]``, as every worker decodes it; None otherwise."""
    if not raw_body or (content_type and "json" not in content_type):
        return None
    try:
        decoded = deepjson.loads(raw_body)  # a body nested deeper than json.loads recurses
    except (ValueError, RecursionError, MemoryError):
        return None
    if (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], Mapping)):
        return decoded[0], dict(decoded[1])
    return None


def undecodable_body(raw_body: str, content_type: str) -> bool:
    """Whether a letter's raw body is one no worker could decode as ``[args, kwargs,
    embed]``: its stored args and kwargs are then not the task's, and replaying them
    would run the task with nothing."""
    return bool(raw_body) and body_payload(raw_body, content_type) is None
