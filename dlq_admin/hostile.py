"""Hostile input the operator surface refuses before it reaches the database.

PostgreSQL stores no NUL character in text or ``jsonb`` (psycopg raises, the page would
answer 500), and an object id from a URL may be anything. Each helper turns such input
into a clear refusal the caller shows: a 400, a 404, a form error, a message.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest

__all__ = ["has_nul", "posted_note", "NUL_REFUSED"]

NUL_REFUSED = "contains a NUL character, which cannot be stored; nothing was done"


def has_nul(value: Any) -> bool:
    """Whether ``value`` (a string, or JSON-able data) holds a NUL anywhere, keys included."""
    if isinstance(value, str):
        return "\x00" in value
    return "\\u0000" in json.dumps(value, default=str)


def posted_note(request: HttpRequest) -> str | None:
    """The operator's note from a POST, or None when it cannot be stored."""
    note = request.POST.get("note", "")
    return None if has_nul(note) else note
