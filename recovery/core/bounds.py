"""How much one dead letter stores, whatever a client sends: the limits in one place.

A message is input. A client (or a task failing with a huge message) can hand a worker a
megabyte exception message, a traceback to match, a history of a hundred thousand forged
attempts, or a body larger than any task takes. Stored whole, each would make the
letter's page slow or unusable, a database write that may be refused (and the letter
spooled for ever), and a copy of whatever the client chose. So before the first write
(``ParkRecord``) every letter is cut to these bounds, each cut saying what it left out:

* exception message and traceback: ``RECOVERY["MESSAGE_MAX_CHARS"]`` and
  ``["TRACEBACK_MAX_CHARS"]`` characters, the end replaced by ``... [N chars cut]``;
* attempt history: the first :data:`HISTORY_KEEP_FIRST` and the last
  :data:`HISTORY_KEEP_LAST` attempts, with one ``{"dropped": N}`` record between them;
  each attempt reduced to its known fields with plain types (a forged header cannot put
  objects where numbers or text belong); ``attempts`` still counts them all;
* payload (args and kwargs): kept whole up to the envelope limit,
  ``RECOVERY["MAX_MESSAGE_BYTES"]``, because a replay needs them; a larger message was
  refused before it ran, so its decoded arguments are not stored a second time;
* raw body: always kept whole. It is the only copy of a message the worker refused, and
  the broker already bounded its size; an operator who raises ``MAX_MESSAGE_BYTES`` can
  replay it. Pages show only its beginning;
* execution options (``headers``): any one value longer than
  :data:`HEADER_VALUE_MAX_CHARS` once encoded is replaced by a note of its size.

Documented in docs/failure-scenarios.md ("What a letter stores").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .. import conf

__all__ = ["bounded", "HISTORY_KEEP_FIRST", "HISTORY_KEEP_LAST",
           "HEADER_VALUE_MAX_CHARS", "cut", "delay_seconds", "bounded_history", "bounded_payload",
           "bounded_headers", "attempt_count"]

#: attempts kept from the start and the end of a letter's history
HISTORY_KEEP_FIRST = 10
HISTORY_KEEP_LAST = 90
#: longest single execution option or header value stored, encoded as JSON
HEADER_VALUE_MAX_CHARS = 8192
#: text fields of an attempt record and their longest stored length
_ENTRY_TEXT = {"at": 64, "kind": 64, "exception_type": 255}
_ENTRY_INTS = ("attempt", "replay", "dropped")
_MARKER_ROOM = 40


def cut(text: str, limit: int, why: str = "") -> str:
    """``text`` in at most ``limit`` characters, its end replaced by a marker saying how
    much was cut (and ``why``, when given)."""
    if len(text) <= limit:
        return text
    marker_room = _MARKER_ROOM + len(why)
    if limit <= marker_room:  # no room for the marker
        return text[: max(limit, 0)]
    kept = limit - marker_room
    return text[:kept] + f"... [{len(text) - kept} chars cut{': ' + why if why else ''}]"


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def delay_seconds(value: Any) -> float | None:
    """An attempt record's ``delay_seconds`` as a finite number of seconds, or None (a
    forged record may hold ``"5"``, ``"NaN"`` or an object there)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _text(value: Any, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, default=repr)[: limit + 1]
    return cut(value, limit)


def _attempt(entry: Any, message_max_chars: int) -> dict:
    """One attempt record with its known fields only, each of its plain type."""
    if not isinstance(entry, Mapping):
        return {"exception_message": _text(entry, message_max_chars)}
    clean: dict[str, Any] = {}
    for name in _ENTRY_INTS:
        if name in entry:
            clean[name] = _integer(entry[name])
    for name, limit in _ENTRY_TEXT.items():
        if name in entry:
            clean[name] = _text(entry[name], limit)
    if "exception_message" in entry:
        clean["exception_message"] = _text(entry["exception_message"], message_max_chars)
    if "delay_seconds" in entry:
        clean["delay_seconds"] = delay_seconds(entry["delay_seconds"])
    if isinstance(entry.get("broker_death"), Mapping):
        clean["broker_death"] = _broker_death(entry["broker_death"])
    return clean


def _broker_death(death: Mapping) -> dict:
    """The broker's own account of why it gave a message up (RabbitMQ's ``x-death``:
    recovery.delivery.broker_dead_letters), its known fields only."""
    clean: dict[str, Any] = {}
    for name in ("count", "delivery_count"):
        if name in death:
            clean[name] = _integer(death[name])
    for name, limit in (("reason", 64), ("queue", 255), ("time", 64)):
        if name in death:
            clean[name] = _text(death[name], limit)
    return clean


def attempt_count(history: list) -> int:
    """Attempts a (bounded) history stands for: its records plus those it left out."""
    count = 0
    for entry in history:
        dropped = entry.get("dropped") if isinstance(entry, Mapping) else None
        count += dropped if isinstance(dropped, int) and dropped > 0 else 1
    return max(count, 1)


def bounded_history(history: Any, message_max_chars: int) -> list:
    """The first and last attempts of ``history``, cleaned, with the rest counted."""
    if not isinstance(history, list):
        history = [] if history is None else [history]
    keep = HISTORY_KEEP_FIRST + HISTORY_KEEP_LAST
    if len(history) <= keep + 1:
        return [_attempt(entry, message_max_chars) for entry in history]
    head = history[:HISTORY_KEEP_FIRST]
    tail = history[-HISTORY_KEEP_LAST:]
    dropped = len(history) - keep
    last_replay = _integer(tail[0].get("replay")) if isinstance(tail[0], Mapping) else None
    marker = {"dropped": dropped, "replay": last_replay or 0,
              "exception_message": f"{dropped} attempts left out (a letter keeps the first "
                                   f"{HISTORY_KEEP_FIRST} and the last {HISTORY_KEEP_LAST})"}
    return ([_attempt(entry, message_max_chars) for entry in head] + [marker]
            + [_attempt(entry, message_max_chars) for entry in tail])


def _encoded_size(value: Any) -> int:
    try:
        return len(json.dumps(value, ensure_ascii=False, default=repr).encode("utf-8",
                                                                           "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        return math.inf  # type: ignore[return-value]


def bounded_payload(args: Any, kwargs: Any, raw_body: str,
                    max_bytes: int | None) -> tuple[Any, Any, str]:
    """``(args, kwargs, raw_body)`` as stored: the body whole (the only copy of a refused
    message); the decoded arguments whole up to ``max_bytes``, left out over it."""
    if max_bytes is None:
        return args, kwargs, raw_body
    if _encoded_size([args, kwargs]) > max_bytes:
        args, kwargs = [], {}
    return args, kwargs, raw_body


def bounded_headers(headers: Any) -> Any:
    """Execution options with any one oversized value (at the top level, or among the
    custom ``headers``) replaced by a note of its size."""
    if not isinstance(headers, Mapping):
        return headers

    def small(value: Any) -> Any:
        size = _encoded_size(value)
        if size <= HEADER_VALUE_MAX_CHARS:
            return value
        return f"[{size if size != math.inf else 'unencodable'} chars not stored: over " \
               f"{HEADER_VALUE_MAX_CHARS}]"

    bounded = {}
    for name, value in headers.items():
        if name == "headers" and isinstance(value, Mapping):
            bounded[name] = {k: small(v) for k, v in value.items()}
        else:
            bounded[name] = small(value)
    return bounded


def bounded(record: Any) -> None:
    """Cut a ``ParkRecord`` (in place) to the bounds above, before it is written or
    spooled. Idempotent: a spooled record drained later is cut the same way again."""
    message_max_chars = int(conf.get("MESSAGE_MAX_CHARS"))
    record.exception_message = cut(str(record.exception_message or ""), message_max_chars)
    record.traceback = cut(str(record.traceback or ""), int(conf.get("TRACEBACK_MAX_CHARS")))
    record.history = bounded_history(record.history, message_max_chars)
    record.args, record.kwargs, record.raw_body = bounded_payload(
        record.args, record.kwargs, str(record.raw_body or ""), conf.get("MAX_MESSAGE_BYTES"))
    record.headers = bounded_headers(record.headers)
