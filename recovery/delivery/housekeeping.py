"""What every worker does besides running tasks, arranged so nothing waits on the database.

``Housekeeping`` (a consumer bootstep, installed by ``recovery.setup``) starts:

* the ``recovery-visibility`` thread: refreshes the Redis visibility of every message the
  worker holds (``recovery.delivery.visibility``). Redis only, never the database: if it stopped,
  held tasks would pass the visibility timeout and run a second time elsewhere;
* the ``recovery-housekeeping`` thread: publishes due retries, drains the dead-letter
  spool, relays the outbox, reconciles saga runs and drops notes of retries long past
  due (`recovery.workflows.broker_waits`), on its own database connection
  with recovery's timeouts (``recovery.store.db_timeouts``). A database that hangs holds up
  this thread only, and each job resumes on its next tick once the database answers;
* the heartbeat metric, on the consumer's timer: it stops when the consumer stops;
* the thread that delivers incident notifications (``recovery.observe.notify``).

Before the consumer takes any work it checks that the private internals of kombu and
django-celery-results it relies on are there, and refuses to start if not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from celery import bootsteps
from django.db import Error as DatabaseError
from django.db import connection

from .. import conf, events
from ..store import db_timeouts, pg_fastpath
from ..store.connections import discard_broken_connections
from ..store.due import publish_due
from ..store.parking import drain_spool
from ..workflows import broker_waits
from ..workflows.outbox import relay
from ..workflows.sagas import reconcile
from . import visibility
from ..core.names import logger_for

__all__ = ["Housekeeping", "Ticker", "STOP_WAIT_SECONDS"]

logger = logger_for(__name__)

# How long stopping a worker waits for a housekeeping thread stuck on a hung database
# before leaving it (it is a daemon thread: it ends with the process).
STOP_WAIT_SECONDS = 5.0
#: How often notes of retries long past due are dropped (shared state in the database).
BROKER_WAIT_PRUNE_SECONDS = 60.0

Job = tuple[float, Callable[[], None]]

_POOLS_OFF_THE_CONSUMER_THREAD = ("celery.concurrency.prefork", "celery.concurrency.thread")


class Ticker:
    """A daemon thread that calls each job every ``interval`` seconds. A job that blocks
    delays only the jobs of its own thread."""

    def __init__(self, name: str, jobs: Sequence[Job], *,
                 on_start: Callable[[], None] | None = None,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.name = name
        self._jobs = list(jobs)
        self._on_start = on_start
        self._on_exit = on_exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Ticker":
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout: float = STOP_WAIT_SECONDS) -> bool:
        """Ask the thread to end and wait at most ``timeout``; returns whether it ended."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("recovery: %s thread still busy after %.0fs (database hung?); "
                           "leaving it", self.name, timeout)
            return False
        return True

    def _run(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            due = [time.monotonic()] * len(self._jobs)
            while not self._stop.is_set():
                for index, (interval, job) in enumerate(self._jobs):
                    if self._stop.is_set():
                        break
                    if time.monotonic() >= due[index]:
                        try:
                            job()
                        except Exception:  # noqa: BLE001 - the thread outlives any one failure
                            logger.exception("recovery: %s job failed", self.name)
                        due[index] = time.monotonic() + interval
                self._stop.wait(max(0.0, min(due) - time.monotonic()))
        finally:
            if self._on_exit is not None:
                self._on_exit()


def _close_connection() -> None:
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail too
        pass


def _database_job(not_yet: str, failed: str, work: Callable[[], object]) -> Callable[[], None]:
    """``work`` whose database errors are logged at INFO (the next tick retries, on a fresh
    connection if this one broke) and whose other errors are logged with the traceback."""
    def run() -> None:
        try:
            work()
        except DatabaseError as exc:
            logger.info("recovery: %s (database: %s)", not_yet, exc)
            discard_broken_connections()
        except Exception:  # noqa: BLE001
            logger.exception("recovery: %s", failed)
    return run


class Housekeeping(bootsteps.StartStopStep):
    """The threads and timer above, per worker."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self._timers: list = []
        self._tickers: list[Ticker] = []

    def start(self, c):
        self.require_internals(c)
        # The consumer's own queries (delivery counts, poison parking) get the bounds too;
        # pool children forked later get the project's settings back (recovery.wiring).
        db_timeouts.bound_thread_connection(statement=self.tasks_run_elsewhere(c))
        vis = float(conf.get("VISIBILITY_TIMEOUT_SECONDS"))
        self._tickers = [
            Ticker("recovery-visibility", [(max(1.0, vis / 4), lambda: self._extend(c))]).start(),
            Ticker("recovery-housekeeping", self.database_jobs(c),
                   on_start=lambda: db_timeouts.bound_thread_connection(statement=True),
                   on_exit=_close_connection).start(),
        ]
        self._timers = [
            c.timer.call_repeatedly(float(conf.get("HEARTBEAT_INTERVAL_SECONDS")),
                                    self._heartbeat, (c,), priority=10),
        ]
        self._heartbeat(c)
        # Listeners start their own threads (notification delivery, recovery.observe.notify).
        events.worker_started.send(hostname=c.hostname)

    def stop(self, c):
        # Every thread is told at once and all share one wait: a hung database delays a
        # worker's stop by STOP_WAIT_SECONDS at most, not by that per thread.
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        tickers, self._tickers = self._tickers, []
        for ticker in tickers:
            ticker.request_stop()
        events.worker_stopping.send(hostname=c.hostname, timeout_seconds=STOP_WAIT_SECONDS)
        for ticker in tickers:
            ticker.stop(max(0.0, deadline - time.monotonic()))
        for entry in self._timers:
            try:
                entry.cancel()
            except Exception:  # noqa: BLE001
                pass
        self._timers = []

    shutdown = stop

    @staticmethod
    def require_internals(c) -> None:
        """Refuse to start on a kombu or django-celery-results whose private parts moved:
        without them held tasks would silently run twice, or parking silently slow down."""
        channel = getattr(getattr(c, "task_consumer", None), "channel", None)
        problems = [p for p in (visibility.missing_internals(channel),
                                pg_fastpath.missing_internals(c.app.backend)) if p]
        if problems:
            raise RuntimeError("celery-recovery cannot run on this worker: " +
                               " ".join(problems))

    @staticmethod
    def tasks_run_elsewhere(c) -> bool:
        """Whether the pool runs tasks outside the consumer's thread (prefork processes or
        threads): only then may the consumer's connection get recovery's statement_timeout,
        which a task's own long query must never meet (solo, gevent, eventlet)."""
        return type(getattr(c, "pool", None)).__module__ in _POOLS_OFF_THE_CONSUMER_THREAD

    @staticmethod
    def database_jobs(c) -> list[Job]:
        saga_interval = float(conf.get("SAGA_RECONCILE_INTERVAL_SECONDS"))
        return [
            (float(conf.get("DUE_POLL_INTERVAL_SECONDS")),
             _database_job("due retries not published yet", "publishing due retries failed",
                           lambda: publish_due(c.app))),
            (float(conf.get("SPOOL_DRAIN_INTERVAL_SECONDS")),
             _database_job("spool not drained yet", "draining the spool failed",
                           lambda: drain_spool(backend=c.app.backend))),
            (float(conf.get("OUTBOX_RELAY_INTERVAL_SECONDS")),
             _database_job("outbox not relayed yet", "outbox relay failed",
                           lambda: relay(c.app))),
            (saga_interval,
             _database_job("saga runs not reconciled yet", "reconciling saga runs failed",
                           lambda: reconcile(older_than_seconds=2 * saga_interval,
                                             check_results=False, app=c.app))),
            (BROKER_WAIT_PRUNE_SECONDS,
             _database_job("old broker-wait notes not pruned yet",
                           "pruning old broker-wait notes failed", broker_waits.forget_past)),
        ]

    @staticmethod
    def _heartbeat(c) -> None:
        events.worker_heartbeat.send(hostname=c.hostname)

    @staticmethod
    def _extend(c) -> None:
        try:
            visibility.extend_held_messages(c)
        except Exception:  # noqa: BLE001 - a failed extension is retried next tick
            logger.warning("recovery: could not extend message visibility", exc_info=True)
