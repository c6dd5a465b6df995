"""Group failures that are the same problem on different data.

"Order 1234 not found" and "Order 98 not found" are one incident; the
fingerprint hashes the task name, exception type and the message with the
variable parts (numbers, UUIDs, hex ids, quoted strings) replaced.
"""

from __future__ import annotations

import functools
import hashlib
import re

__all__ = ["normalise_message", "fingerprint"]

_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
# 0x-prefixed hex, or six or more hex digits with at least one digit and one letter (a
# run of a-f letters alone could be a word such as "facade"; all digits is a number).
_HEX = re.compile(
    r"\b(?:0x[0-9a-fA-F]+|(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,})\b"
)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalise_message(message: str) -> str:
    text = _UUID.sub("<uuid>", message)
    text = _QUOTED.sub("<str>", text)
    # Same placeholder as numbers: a hex id that happens to be all digits ("1234567" as a
    # short commit sha) must group with one that has letters ("1a2b3c4").
    text = _HEX.sub("<n>", text)
    return _NUMBER.sub("<n>", text)


@functools.lru_cache(maxsize=256)  # parking, escalation and Sentry each ask for the same letter's
def fingerprint(task_name: str, exception_type: str, message: str) -> str:
    key = "\x1f".join((task_name, exception_type, normalise_message(message)))
    return hashlib.sha1(key.encode("utf-8", "backslashreplace")).hexdigest()
