"""Counts summed in memory and handed to a publisher on a timer: a receiver never waits.

A receiver runs in the task's thread, inside the lifecycle (a retry being scheduled, a
letter being parked). Adding to a :class:`Buffer` takes a lock for a dictionary update;
writing the lines or calling PutMetricData happens in the buffer's own daemon thread,
every ``interval_seconds`` or as soon as ``max_series`` distinct series wait. Summing
also bounds the output: a thousand failures of one task in ten seconds are one line.

A publisher that fails keeps the counts for the next flush (those it reports as not sent,
see :class:`~.emf.Unsent`), up to ``max_series`` series; beyond that they are dropped and
the log says how many. A process that dies by SIGKILL loses at most one interval.

An interval of 0 publishes each count at once in the caller's thread: one EMF line per
event, for processes too short-lived for a timer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from ...core.names import logger_for
from .emf import Key, Unsent

__all__ = ["Buffer", "Publisher"]

logger = logger_for(__name__)

#: Called with the summed counts and the time the first of them was added.
Publisher = Callable[[Mapping[Key, float], float], None]

THREAD_NAME = "recovery-cloudwatch"


class Buffer:
    """One process's counts waiting for their publisher.

    Args:
        publish: writes or sends a flush; may raise (:class:`~.emf.Unsent` for a part).
        interval_seconds: how long counts wait; 0 publishes each at once.
        max_series: distinct series held before an early flush, and kept after a failed one.
        clock: the time source (tests pass their own).
    """

    def __init__(self, publish: Publisher, *, interval_seconds: float, max_series: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.publish = publish
        self.interval_seconds = interval_seconds
        self.max_series = max_series
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[Key, float] = {}
        self._opened_at: float | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def add(self, key: Key, amount: float = 1.0) -> None:
        """Count ``amount`` more for ``key``."""
        if self.interval_seconds <= 0:
            self.publish({key: amount}, self._clock())
            return
        with self._lock:
            if not self._counts:
                self._opened_at = self._clock()
            self._counts[key] = self._counts.get(key, 0.0) + amount
            full = len(self._counts) >= self.max_series
        if self._thread is None:
            self._start()
        if full:
            self._wake.set()

    def pending(self) -> dict[Key, float]:
        """A copy of what waits (for tests and for the shutdown log)."""
        with self._lock:
            return dict(self._counts)

    def flush(self) -> int:
        """Publish what waits, now, in this thread; returns how many series were handed
        over. What the publisher could not send waits for the next flush."""
        with self._lock:
            counts, self._counts = self._counts, {}
            opened_at, self._opened_at = self._opened_at, None
        if not counts:
            return 0
        try:
            self.publish(counts, opened_at if opened_at is not None else self._clock())
        except Unsent as unsent:
            self._keep(unsent.counts, opened_at)
            raise
        except Exception:
            self._keep(counts, opened_at)
            raise
        return len(counts)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (waiting at most ``timeout`` seconds) and publish what is left."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.flush()

    def _keep(self, counts: Mapping[Key, float], opened_at: float | None) -> None:
        dropped = 0
        with self._lock:
            if self._opened_at is None or (opened_at is not None and opened_at < self._opened_at):
                self._opened_at = opened_at
            for key, amount in counts.items():
                if key in self._counts or len(self._counts) < self.max_series:
                    self._counts[key] = self._counts.get(key, 0.0) + amount
                else:
                    dropped += 1
        if dropped:
            logger.warning("recovery: dropped %d CloudWatch metric series the publisher could "
                           "not send (more than %d waiting)", dropped, self.max_series)

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                return  # stop() flushes, in its own thread
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the thread outlives any one failure
                if not self._failing:
                    logger.warning("recovery: could not publish CloudWatch metrics (kept for "
                                   "the next flush; further failures at debug level)",
                                   exc_info=True)
                else:
                    logger.debug("recovery: could not publish CloudWatch metrics", exc_info=True)
                self._failing = True
            else:
                if self._failing:
                    logger.info("recovery: CloudWatch metrics are published again")
                self._failing = False
