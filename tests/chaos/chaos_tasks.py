"""The chaos suite's task: its outcome is scripted by its arguments.

Each run of the body that gets to its end appends one JSON line (task id, replay,
attempt, outcome, time) to an append-only file of its own process in
``CHAOS_EFFECTS_DIR``, a directory no fault touches: one ``os.write`` of a line opened
with ``O_APPEND`` is atomic, so the file survives a SIGKILL with whole lines. Two lines
for one (task id, replay, attempt) are a side effect performed twice.
"""

from __future__ import annotations

import json
import os
import random
import time

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy
from recovery.core import headers as hdr
from recovery.core.errors import DependencyError, TransientError

from . import TASK_NAME

_effects_fd: int | None = None
_effects_pid: int | None = None


def _record(request, attempt: int, outcome: str) -> None:
    global _effects_fd, _effects_pid
    if _effects_pid != os.getpid():  # a forked pool child gets its own file
        directory = os.environ["CHAOS_EFFECTS_DIR"]
        _effects_fd = os.open(os.path.join(directory, f"effects-{os.getpid()}.jsonl"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _effects_pid = os.getpid()
    line = json.dumps({"id": request.id, "replay": int(hdr.read(request, hdr.REPLAY, 0) or 0),
                       "attempt": attempt, "outcome": outcome, "at": time.time()}) + "\n"
    os.write(_effects_fd, line.encode("utf-8", "backslashreplace"))


@shared_task(bind=True, base=RecoveryTask, name=TASK_NAME,
             retry_policy=RetryPolicy(max_attempts=6, initial_delay_seconds=0.2,
                                      multiplier=2.0, max_delay_seconds=1.0))
def scripted(self, key: str, outcome: str = "plain", failures: int = 0) -> str:
    """``plain`` succeeds; ``transient`` raises TransientError on its first ``failures``
    attempts, then succeeds; ``permanent`` raises a permanent DependencyError."""
    attempt = len(self.attempt_history) + 1
    time.sleep(random.uniform(0.005, 0.2))
    if outcome == "permanent":
        _record(self.request, attempt, "permanent")
        raise DependencyError(f"chaos: {key} is refused for good", permanent=True)
    if outcome == "transient" and attempt <= failures:
        _record(self.request, attempt, "transient")
        raise TransientError(f"chaos: {key} fails on attempt {attempt} of {failures + 1}")
    _record(self.request, attempt, "ok")
    return key
