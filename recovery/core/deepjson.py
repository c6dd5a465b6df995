"""JSON that ``json.loads`` cannot read because it nests too deep.

``json.loads`` recurses once per level and raises ``RecursionError`` (not a
``ValueError``) near Python's recursion limit, a thousand levels. PostgreSQL's jsonb
holds far deeper values, and a hostile message body can be nested 10,000 deep: a
letter holding one must still load, show (masked, depth-bounded by
:mod:`recovery.core.redaction`) and export. :func:`loads` reads such text without recursing;
:class:`DeepJSONField` is the ``JSONField`` that uses it when reading rows.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring
from typing import Any

from django.db import models

__all__ = ["loads", "DeepJSONField"]

_SPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_CONSTANTS = {"null": None, "true": True, "false": False, "NaN": float("nan"),
              "Infinity": float("inf"), "-Infinity": float("-inf")}


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``, at any depth: the fast C reader, or the iterative one when
    the text nests deeper than the C reader recurses."""
    try:
        return json.loads(text)
    except RecursionError:
        return _loads_iteratively(text.decode("utf-8") if isinstance(text, bytes) else text)


def _error(message: str, text: str, pos: int) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, text, pos)


def _key(text: str, pos: int, frame: list) -> int:
    """Read an object key and its colon at ``pos`` into ``frame``; the position after."""
    pos = _SPACE.match(text, pos).end()
    if text[pos:pos + 1] != '"':
        raise _error("Expecting property name enclosed in double quotes", text, pos)
    frame[1], pos = scanstring(text, pos + 1)
    pos = _SPACE.match(text, pos).end()
    if text[pos:pos + 1] != ":":
        raise _error("Expecting ':' delimiter", text, pos)
    return pos + 1


def _scalar(text: str, pos: int) -> tuple[Any, int]:
    if text[pos:pos + 1] == '"':
        return scanstring(text, pos + 1)
    number = _NUMBER.match(text, pos)
    if number and number.end() > pos:
        integer, fraction, exponent = number.groups()
        if fraction or exponent:
            return float(integer + (fraction or "") + (exponent or "")), number.end()
        return int(integer), number.end()
    for word, value in _CONSTANTS.items():
        if text.startswith(word, pos):
            return value, pos + len(word)
    raise _error("Expecting value", text, pos)


def _loads_iteratively(text: str) -> Any:
    stack: list[list] = []  # [container, key of the value being read (objects)]
    pos = 0
    while True:
        pos = _SPACE.match(text, pos).end()
        opening = text[pos:pos + 1]
        if opening in ("[", "{"):
            container: Any = [] if opening == "[" else {}
            closing = "]" if opening == "[" else "}"
            after = _SPACE.match(text, pos + 1).end()
            if text[after:after + 1] != closing:
                frame = [container, None]
                stack.append(frame)
                pos = _key(text, pos + 1, frame) if opening == "{" else pos + 1
                continue
            value, pos = container, after + 1
        else:
            value, pos = _scalar(text, pos)
        while True:  # hand the value to its container; close the containers that end here
            if not stack:
                if _SPACE.match(text, pos).end() != len(text):
                    raise _error("Extra data", text, pos)
                return value
            frame = stack[-1]
            if isinstance(frame[0], list):
                frame[0].append(value)
            else:
                frame[0][frame[1]] = value
            pos = _SPACE.match(text, pos).end()
            if text[pos:pos + 1] == ",":
                pos = _key(text, pos + 1, frame) if isinstance(frame[0], dict) else pos + 1
                break
            if text[pos:pos + 1] != ("]" if isinstance(frame[0], list) else "}"):
                raise _error("Expecting ',' delimiter", text, pos)
            value, pos = stack.pop()[0], pos + 1


class DeepJSONField(models.JSONField):
    """A ``JSONField`` whose rows load at any depth (see the module docstring).

    It deconstructs as a plain ``JSONField``: the column is the same jsonb, so swapping
    it in needs no migration.
    """

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        try:
            return super().from_db_value(value, expression, connection)
        except RecursionError:
            return loads(value)

    def deconstruct(self) -> tuple:
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.JSONField", args, kwargs
