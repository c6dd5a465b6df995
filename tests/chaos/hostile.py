"""The hostile messages the chaos suite sends among its tasks, published raw with kombu.

Each one carries a unique marker (in its arguments, its body or its id) so its dead letter
can be found whatever id the runtime had to give it, and a pattern its letter's ``reason``
must match: the reason must name what is wrong with the message, not just that it failed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from kombu import Connection, Producer

from . import TASK_NAME as NAME

FIVE_MB = 5 * 1024 * 1024


@dataclass(frozen=True)
class Hostile:
    label: str
    marker: str
    reason_pattern: str
    body: bytes
    headers: dict = field(default_factory=dict)
    content_type: str = "application/json"

    @property
    def task_id(self) -> str | None:
        """The id to look the letter up by, when PostgreSQL can store it as it is."""
        value = self.headers.get("id")
        if isinstance(value, str) and len(value) <= 255 and "\x00" not in value:
            return value
        return None


def _headers(task: str, task_id: object, **extra) -> dict:
    return {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": "", "kwargsrepr": "", "origin": "chaos-suite", "ignore_result": False,
            **extra}


def _body(args: list, kwargs: dict | None = None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs or {}, embed]).encode()


def catalogue() -> list[Hostile]:
    """A dozen messages no worker may run, lose or choke on."""
    def marker(n: int) -> str:
        return f"hostile-{n}-{uuid.uuid4().hex}"

    def tid() -> str:
        return str(uuid.uuid4())

    m = [marker(n) for n in range(12)]
    ID = r"(?i)\bid\b"
    NAME_RE = r"(?i)(name|no task)"
    return [
        Hostile("over-long task id (400 chars)", m[0], ID,
                _body([m[0], "plain", 0]), _headers(NAME, "long-" + m[0] + "x" * 400)),
        Hostile("NUL-bearing task id", m[1], ID,
                _body([m[1], "plain", 0]), _headers(NAME, f"nul\x00{m[1]}")),
        Hostile("over-long task name (400 chars)", m[2], NAME_RE,
                _body([m[2], "plain", 0]), _headers("chaos." + "n" * 400, tid())),
        Hostile("NUL-bearing task name", m[3], NAME_RE,
                _body([m[3], "plain", 0]), _headers(NAME + "\x00evil", tid())),
        Hostile("unknown task", m[4], r"no task named",
                _body([m[4]]), _headers("billing.tasks.removed_last_release", tid())),
        Hostile("body that is not JSON", m[5], r"cannot be decoded",
                b'{"' + m[5].encode() + b'": not json', _headers(NAME, tid())),
        Hostile("body that is not UTF-8", m[6], r"cannot be decoded",
                b"\xff\xfe" + m[6].encode() + b"\x80\x81", _headers(NAME, tid())),
        Hostile("not a Celery task message (no task, no id)", m[7], r"not a Celery task message",
                json.dumps({"event": "order.created", "marker": m[7]}).encode()),
        Hostile("body of the wrong shape (a string)", m[8], r"(?i)(invalid|cannot be decoded)",
                json.dumps(m[8]).encode(), _headers(NAME, tid())),
        Hostile("forged history header (a string)", m[9], r"(?i)(history|header)",
                _body([m[9], "transient", 1]),
                _headers(NAME, tid(), recovery_history="'; DROP TABLE recovery_deadletter; --")),
        Hostile("forged history header (entries not objects)", m[10], r"(?i)(history|header)",
                _body([m[10], "transient", 1]),
                _headers(NAME, tid(), recovery_history=[1, "two", None, [3]])),
        Hostile("5 MB payload", m[11], r"(?i)(large|size|bytes|MB|limit)",
                _body([m[11] + "x" * FIVE_MB, "plain", 0]), _headers(NAME, tid())),
    ]


def publish(broker_url: str, message: Hostile) -> None:
    with Connection(broker_url) as conn:
        Producer(conn).publish(
            message.body, routing_key="celery", exchange="", headers=message.headers,
            content_type=message.content_type, content_encoding="utf-8", retry=True,
            retry_policy={"max_retries": 30, "interval_start": 0.5, "interval_step": 0.5,
                          "interval_max": 1.0},
        )
