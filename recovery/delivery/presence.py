"""Which workers are alive, known without asking them.

The watchdog asks the workers over the broker what they hold, and a worker that does not
answer in time looks like one that holds nothing. If it is alive (its main process
stopped, swapping, blocked on a slow call), taking its silence for "holds nothing"
recovers work that will still run: a replay parked again, then run twice; a saga step
dispatched twice. So each worker's main process stamps its name and the time in the
shared state (``recovery.workflows.shared_state``) every ``HEARTBEAT_INTERVAL_SECONDS``, and
removes it when it shuts down cleanly; a worker stamped within ``ALIVE_BEATS`` intervals
is alive, and a sweep that does not hear from one of those decides nothing.

Costs one shared-state write per worker per interval.
"""

from __future__ import annotations

import time
from typing import Any

from celery import bootsteps

from .. import conf
from ..workflows.shared_state import store
from ..core.names import logger_for

__all__ = ["Presence", "beat", "leave", "alive", "ALIVE_BEATS"]

logger = logger_for(__name__)

KEY = "workers"
#: a worker is alive while its last stamp is younger than this many heartbeat intervals
ALIVE_BEATS = 3
#: stamps older than this many intervals are dropped (workers gone without a clean stop)
_FORGET_BEATS = 100


def _interval() -> float:
    return float(conf.get("HEARTBEAT_INTERVAL_SECONDS"))


def beat(hostname: str, now: float | None = None) -> None:
    """Stamp ``hostname`` (Celery's ``name@host``) alive now."""
    now = time.time() if now is None else now
    forget_before = now - _FORGET_BEATS * _interval()

    def change(record: dict) -> None:
        for name in [name for name, at in record.items() if float(at) < forget_before]:
            del record[name]
        record[hostname] = now

    store().update(KEY, change)


def leave(hostname: str) -> None:
    """``hostname`` stopped cleanly: it holds nothing any more."""
    store().update(KEY, lambda record: record.pop(hostname, None))


def alive(now: float | None = None) -> set[str]:
    """The workers stamped within the last ``ALIVE_BEATS`` heartbeat intervals."""
    now = time.time() if now is None else now
    since = now - ALIVE_BEATS * _interval()
    return {name for name, at in store().get(KEY).items() if float(at) >= since}


class Presence(bootsteps.StartStopStep):
    """Consumer bootstep: stamp this worker alive every heartbeat interval, and remove the
    stamp on a clean shutdown. A failed stamp is logged and tried again next interval."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer = None

    def start(self, c: Any) -> None:
        self._timer = c.timer.call_repeatedly(_interval(), self._beat, (c,), priority=10)
        self._beat(c)

    def stop(self, c: Any) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            try:
                timer.cancel()
            except Exception:  # noqa: BLE001
                pass

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        try:
            leave(c.hostname)
        except Exception:  # noqa: BLE001 - the stamp ages out on its own
            logger.warning("recovery: could not remove %s from the live workers", c.hostname,
                           exc_info=True)

    @staticmethod
    def _beat(c: Any) -> None:
        try:
            beat(c.hostname)
        except Exception:  # noqa: BLE001 - never in the way of the worker
            logger.warning("recovery: could not stamp %s alive", c.hostname, exc_info=True)
