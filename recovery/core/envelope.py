"""What a task message must look like before a worker runs it.

Celery runs any message whose task name it knows. A message a client got wrong, or one
sent on purpose to do harm, can still carry something no run can survive: a task id no
column can hold (its result can never be stored, so it would run again after every
restart), a body far larger than any task expects, or one of recovery's own headers
forged (a history that is not a list of attempts makes the retry policy count
characters). Such a message is refused before it runs and parked as ``poison`` with a
reason that names what is wrong, so an operator sees it, nothing runs half-way, and no
worker chokes on it.

The checks are pure (no database, no broker) and cheap: a few type and length checks
per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery.exceptions import InvalidTaskError

from . import headers as hdr

__all__ = ["EnvelopeError", "MAX_ID_CHARS", "problem"]

#: the longest task id the result and dead-letter tables can hold
MAX_ID_CHARS = 255


class EnvelopeError(InvalidTaskError):
    """A task message refused before it ran; ``str()`` says why, for the letter's reason.

    An :class:`~celery.exceptions.InvalidTaskError`, so Celery's consumer hands it to
    ``on_invalid_task``, which :class:`recovery.delivery.worker.RecoveryConsumer` parks as poison.
    """


def _size(count: int) -> str:
    if count >= 1024 * 1024:
        return f"{count / (1024 * 1024):.1f} MiB"
    if count >= 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count} bytes"


def _id_problem(what: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} is not a non-empty string ({type(value).__name__})"
    if "\x00" in value:
        return f"{what} contains a NUL character, which no database column can hold"
    if len(value) > MAX_ID_CHARS:
        return (f"{what} is {len(value)} characters long; at most {MAX_ID_CHARS} can be "
                f"stored")
    return None


def _number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _header_problem(message_headers: Mapping[str, Any]) -> str | None:
    # Celery exposes custom headers at the top level; some clients nest them under
    # "headers" (hdr.read looks in both places, so both are checked).
    nested = message_headers.get("headers")
    headers = {**(nested if isinstance(nested, Mapping) else {}),
               **{k: v for k, v in message_headers.items() if v is not None}}
    history = headers.get(hdr.HISTORY)
    if history is not None:
        if not isinstance(history, list) or not all(isinstance(e, Mapping) for e in history):
            return (f"forged or corrupt {hdr.HISTORY} header: not a list of attempt records "
                    f"({type(history).__name__})")
        for entry in history:
            delay = entry.get("delay_seconds")
            if delay is not None and not _number(delay):
                return (f"forged or corrupt {hdr.HISTORY} header: an attempt's delay_seconds "
                        f"is not a number ({delay!r:.40})")
    started = headers.get(hdr.STARTED_AT)
    if started is not None and not _number(started):
        return f"forged or corrupt {hdr.STARTED_AT} header: not a number ({started!r:.40})"
    replay = headers.get(hdr.REPLAY)
    if replay is not None and (isinstance(replay, bool) or not isinstance(replay, int)
                               or replay < 0):
        return f"forged or corrupt {hdr.REPLAY} header: not a count ({replay!r:.40})"
    for name in (hdr.POLICY, hdr.SAGA):
        value = headers.get(name)
        if value is not None and not isinstance(value, Mapping):
            return f"forged or corrupt {name} header: not an object ({type(value).__name__})"
    return None


def problem(*, task_id: Any, headers: Mapping[str, Any] | None, body_bytes: int,
            max_body_bytes: int | None) -> str | None:
    """Why this message must not run, or None when it may.

    Args:
        task_id: the id the message carries.
        headers: the message's headers (recovery's own are read from them).
        body_bytes: the size of the encoded body.
        max_body_bytes: ``RECOVERY["MAX_MESSAGE_BYTES"]``; None for no limit.
    """
    reason = _id_problem("task id", task_id)
    if reason:
        return reason
    if max_body_bytes is not None and body_bytes > max_body_bytes:
        return (f"message body is too large: {_size(body_bytes)}, over the limit of "
                f"{_size(max_body_bytes)} (RECOVERY['MAX_MESSAGE_BYTES'])")
    if headers:
        return _header_problem(headers)
    return None
