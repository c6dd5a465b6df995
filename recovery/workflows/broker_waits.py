"""Retries that wait inside the broker, where no worker can be asked about them.

On Redis a short retry waits in a worker's memory as an ETA message, and the watchdog
asks the workers what they hold before it takes a replay or a saga step for lost. On
RabbitMQ, Celery's native delayed delivery keeps the message in the broker's delay
queues until it is due: no worker holds it, and asking them would say "lost" about a
retry that is merely waiting, and the watchdog would run it a second time. So a task
that hands a retry to the broker's delay notes it here (one shared-state write, on
RabbitMQ only), and the watchdog counts a noted retry as held until shortly after it is
due (:data:`GRACE_SECONDS`, for the message to reach a worker).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from .. import conf
from ..core.names import logger_for
from . import shared_state

__all__ = ["GRACE_SECONDS", "note", "waiting", "forget_past"]

logger = logger_for(__name__)

KEY_PREFIX = "waiting:"
#: How long after it was due a noted retry still counts as waiting: the broker moves it to
#: its task queue and a worker prefetches it within seconds, after which it is held.
GRACE_SECONDS = 30.0


def note(task_id: str, delay_seconds: float, now: float | None = None) -> None:
    """Record that ``task_id`` waits in the broker for ``delay_seconds``. Never raises:
    without the note the watchdog may redispatch it, which the note exists to prevent,
    but a retry is never refused for it."""
    until = (time.time() if now is None else now) + float(delay_seconds)

    def later(record: dict) -> None:
        record["until"] = max(float(record.get("until") or 0), until)

    try:
        # The note outlives its use by a grace period, then goes (Redis: by itself; the
        # database: forget_past, from the workers' housekeeping).
        shared_state.store().update(KEY_PREFIX + task_id, later,
                                    expires_in=float(delay_seconds) + 2 * GRACE_SECONDS)
    except Exception:  # noqa: BLE001 - shared state down: the retry goes ahead anyway
        logger.warning("recovery: could not note that %s waits %.1fs in the broker; the "
                       "watchdog may take it for lost meanwhile", task_id, delay_seconds,
                       exc_info=True)


def waiting(task_ids: Iterable[str], now: float | None = None) -> set[str]:
    """The ids among ``task_ids`` noted as waiting in the broker (until shortly after they
    are due). Raises when the shared state cannot be read: the watchdog then decides
    nothing rather than take a waiting retry for lost."""
    now = time.time() if now is None else now
    store = shared_state.store()
    found = set()
    for task_id in set(task_ids):
        until = store.get(KEY_PREFIX + task_id).get("until")
        if isinstance(until, (int, float)) and until + GRACE_SECONDS > now:
            found.add(task_id)
    return found


def forget_past() -> int:
    """Drop the notes of retries long past due, where notes do not expire by themselves
    (shared state kept in the database): a note is written only for a countdown the broker
    carries, at most ``BROKER_DELAY_MAX_SECONDS``, so one unchanged for that plus twice the
    grace period is of no more use. Returns how many went."""
    unchanged_for = float(conf.get("BROKER_DELAY_MAX_SECONDS")) + 2 * GRACE_SECONDS
    return shared_state.store().forget(KEY_PREFIX, unchanged_for)
