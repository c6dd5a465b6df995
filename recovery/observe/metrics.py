"""Prometheus metrics, ``recovery_*`` names, low-cardinality labels (never a task id).

Two kinds:

* Events, counted where they happen (task failures, retries, parked letters, replays,
  compensations, fallbacks, circuit changes), and each worker's heartbeat. Every recording
  function here swallows its own errors: a broken exporter never stops a task from
  retrying or being parked.
* Backlogs and shared state, read when scraped (:class:`SpoolCollector` here;
  :mod:`recovery.observe.backlogs` has the database's and the circuits'): dead letters by status, the age of the
  oldest parked letter, the outbox, the due-table, the spool, and every circuit's state as
  the workers share it. Only the Django view (:mod:`recovery.observe.views`) reads the database and
  the shared circuit state.

Celery's prefork pool runs tasks in child processes, so the counters use prometheus_client's
multiprocess mode: each process writes its values to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and a scrape sums them. The files of a dead child stay, so no
count is lost when a child is recycled or killed. A worker started without the variable
makes a private directory for itself and its children (:func:`ensure_multiprocess_dir`,
called by ``recovery.setup(app)`` at ``worker_init``); see docs/metrics.md.
"""

from __future__ import annotations

import functools
import glob
import importlib
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from celery import current_app

from .. import conf
from .backends import PROMETHEUS, counted_by
from ..store.spool import Spool
from ..core.names import MovedModuleWarning, logger_for, public_module

__all__ = [
    "task_failed", "retry_scheduled", "dead_letter_parked", "replay_outcome",
    "compensation_outcome", "fallback_used", "fallback_failed", "circuit_changed",
    "saga_escalated", "worker_heartbeat", "incident_opened", "incident_resolved",
    "notification_outcome", "internal_error", "write_deferred", "exposition", "ensure_multiprocess_dir",
    "multiprocess_dir", "mark_process_dead", "start_worker_server", "stop_worker_server",
    "SpoolCollector", "CIRCUIT_STATE_VALUES", "Cached", "label", "task_label", "ran_task_label",
    "UNREGISTERED_TASK",
]

logger = logger_for(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: recovery_circuit_state and recovery_circuit_status values
CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
#: The dead-letter statuses recovery_dead_letters counts (DeadLetter.Status values).
OPEN_STATUSES = ("parked", "replaying")
_LABEL_MAX_CHARS = 120
#: The ``task`` label of every task name this process does not know (see task_label).
UNREGISTERED_TASK = "unregistered"

# name (without _total), type, help, labels, gauge multiprocess mode
_SPECS: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "failures": ("recovery_task_failures", "counter",
                 "Task runs that raised, by classification.", ("task", "kind", "transient"), ""),
    "retries": ("recovery_retries", "counter",
                "Retries scheduled by the retry policy.", ("task", "kind"), ""),
    "parked": ("recovery_dead_letters_parked", "counter",
               "Dead letters parked (written to the table or the spool).", ("task", "kind"), ""),
    "replays": ("recovery_replays", "counter",
                "Dead-letter replays by outcome: published, failed (not published), resolved "
                "(the replayed run succeeded), parked_again.", ("outcome",), ""),
    "compensations": ("recovery_compensations", "counter",
                      "Compensations by outcome: published, publish_failed (dead-letter "
                      "compensate), succeeded, failed (saga compensation steps).",
                      ("outcome",), ""),
    "fallbacks": ("recovery_fallbacks", "counter",
                  "Fallbacks whose result stood as the task's result.", ("task", "reason"), ""),
    "fallback_failures": ("recovery_fallback_failures", "counter",
                          "Fallbacks that failed too (the task was then parked).",
                          ("task", "reason"), ""),
    "internal_errors": ("recovery_internal_errors", "counter",
                        "Errors outside a task's body that were not its failure (a result "
                        "store, the pool): the task was neither parked nor marked failed.",
                        ("task", "exception"), ""),
    "deferred_writes": ("recovery_deferred_writes", "counter",
                        "Bookkeeping writes the database refused after a task succeeded, "
                        "spooled for the drain: result, replay_succeeded, saga_succeeded.",
                        ("type",), ""),
    "circuit_state": ("recovery_circuit_state", "gauge",
                      "Circuit breaker state per dependency, as last changed by this "
                      "deployment: 0 closed, 1 half-open, 2 open.", ("dependency",),
                      "mostrecent"),
    "circuit_transitions": ("recovery_circuit_transitions", "counter",
                            "Circuit breaker state changes, by the state entered.",
                            ("dependency", "state"), ""),
    "incidents_opened": ("recovery_incidents_opened", "counter",
                         "Incidents opened by escalation, by reason and severity.",
                         ("reason", "severity"), ""),
    "incidents_resolved": ("recovery_incidents_resolved", "counter",
                           "Incidents resolved by an operator, by reason.", ("reason",), ""),
    "notifications": ("recovery_escalation_notifications", "counter",
                      "Escalation notifications by channel and outcome: sent, retried "
                      "(a delivery failed and will be tried again), failed (gave up).",
                      ("channel", "outcome"), ""),
    "escalations": ("recovery_saga_escalations", "counter",
                    "Saga runs escalated to a human (a compensation failed for good).",
                    ("saga",), ""),
    "rehearsal_injections": ("recovery_rehearsal_injections", "counter",
                             "Task runs a failure rehearsal hit with its fault.",
                             ("rehearsal", "task", "fault"), ""),
    "rehearsal_parked": ("recovery_rehearsal_dead_letters_parked", "counter",
                         "Dead letters a rehearsal's injected fault parked (also counted in "
                         "recovery_dead_letters_parked_total, so its alerts fire as they "
                         "would for real).", ("rehearsal", "task"), ""),
    # "max", not "livemax": a worker that died keeps its last timestamp in a shared
    # multiprocess directory, so its age grows and the heartbeat alert fires instead of the
    # series vanishing.
    "heartbeat": ("recovery_worker_heartbeat_timestamp_seconds", "gauge",
                  "Unix time of the worker's last housekeeping heartbeat, by Celery hostname.",
                  ("worker",), "max"),
}

_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_local_registry: Any = None
_warned: set[str] = set()
#: Names of tasks that ran in this process (a RecoveryTask reports itself): registered ones.
_ran_tasks: set[str] = set()


def multiprocess_dir() -> str | None:
    """The multiprocess directory in use, or None (single-process mode)."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


def _safe(func: Callable) -> Callable:
    """Never let a metric break the caller; warn once per function and process."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics are a side effect that must never fail
            if func.__name__ not in _warned:
                _warned.add(func.__name__)
                logger.warning("recovery: metric %s failed (further failures are logged at "
                               "debug level)", func.__name__, exc_info=True)
            else:
                logger.debug("recovery: metric %s failed", func.__name__, exc_info=True)
        return None

    return wrapper


def label(value: Any) -> str:
    """A label value cut to a bounded length (Prometheus keeps every distinct value)."""
    text = str(value if value is not None else "")
    return text[:_LABEL_MAX_CHARS]


def ran_task_label(name: str) -> str:
    """The label of a task that is running here: a registered task, so a known name.

    Shared with the other exporters (:mod:`recovery.observe.cloudwatch`): a name one of
    them saw run here is a name :func:`task_label` keeps for all."""
    text = label(name)
    _ran_tasks.add(text)
    return text


def task_label(name: Any) -> str:
    """The label of a task name read from a message or a row, which anyone who can publish
    may forge: kept when the app knows the task, else ``unregistered``, so a flood of
    made-up names adds one series, not one per name (one CloudWatch metric, which is billed
    per metric, not one per name)."""
    text = label(name)
    if text in _ran_tasks:
        return text
    try:
        known = text in current_app.tasks
    except Exception:  # noqa: BLE001 - an app that cannot list its tasks knows none
        known = False
    return text if known else UNREGISTERED_TASK


def _metric(key: str) -> Any:
    metric = _metrics.get(key)
    if metric is not None:
        return metric
    with _lock:
        metric = _metrics.get(key)
        if metric is None:
            from prometheus_client import CollectorRegistry, Counter, Gauge

            global _local_registry
            name, kind, help_text, labels, mode = _SPECS[key]
            # In multiprocess mode values live in files and are collected from there: the
            # metric objects must not be registered anywhere that is also exposed.
            registry = None
            if multiprocess_dir() is None:
                if _local_registry is None:
                    _local_registry = CollectorRegistry(auto_describe=True)
                registry = _local_registry
            if kind == "counter":
                metric = Counter(name, help_text, labels, registry=registry)
            else:
                metric = Gauge(name, help_text, labels, registry=registry,
                               multiprocess_mode=mode or "all")
            _metrics[key] = metric
    return metric


def _reset() -> None:
    """Forget the metric objects (they are created again, in the current mode, on next use)."""
    global _local_registry
    with _lock:
        _metrics.clear()
        _local_registry = None
        values = sys.modules.get("prometheus_client.values")
        if values is not None:
            # prometheus_client picks its value class (in memory or in files) when imported;
            # pick again now that the directory may have changed.
            values.ValueClass = values.get_value_class()


# -- events -----------------------------------------------------------------------------------


@_safe
def task_failed(task: str, kind: str, transient: bool) -> None:
    """A task run raised; ``kind`` and ``transient`` are its classification."""
    _metric("failures").labels(ran_task_label(task), label(kind), "true" if transient else "false").inc()


@_safe
def retry_scheduled(task: str, kind: str) -> None:
    _metric("retries").labels(ran_task_label(task), label(kind)).inc()


@_safe
def dead_letter_parked(task: str, kind: str, replay: int = 0) -> None:
    """A letter was parked; a replayed task parked again also counts as a replay outcome."""
    _metric("parked").labels(task_label(task), label(kind)).inc()
    if replay:
        _metric("replays").labels("parked_again").inc()


@_safe
def rehearsal_injected(rehearsal: str, task: str, fault: str) -> None:
    _metric("rehearsal_injections").labels(label(rehearsal), ran_task_label(task), label(fault)).inc()


@_safe
def rehearsal_parked(rehearsal: str, task: str) -> None:
    _metric("rehearsal_parked").labels(label(rehearsal), task_label(task)).inc()


@_safe
def internal_error(task: str, exception: str) -> None:
    """An error escaped the pool child outside the task's body and was not a decoding
    failure (see recovery.delivery.worker.RecoveryRequest)."""
    _metric("internal_errors").labels(task_label(task), label(exception)).inc()


@_safe
def write_deferred(kind: str) -> None:
    """A bookkeeping write after a success was spooled (recovery.store.deferred)."""
    _metric("deferred_writes").labels(label(kind)).inc()


@_safe
def replay_outcome(outcome: str, count: int = 1) -> None:
    if count > 0:
        _metric("replays").labels(label(outcome)).inc(count)


@_safe
def compensation_outcome(outcome: str) -> None:
    _metric("compensations").labels(label(outcome)).inc()


@_safe
def fallback_used(task: str, reason: str) -> None:
    _metric("fallbacks").labels(ran_task_label(task), label(reason)).inc()


@_safe
def fallback_failed(task: str, reason: str) -> None:
    _metric("fallback_failures").labels(ran_task_label(task), label(reason)).inc()


@_safe
def circuit_changed(dependency: str, state: str) -> None:
    """A circuit entered ``state`` (closed, half_open, open)."""
    _metric("circuit_state").labels(label(dependency)).set(CIRCUIT_STATE_VALUES[state])
    _metric("circuit_transitions").labels(label(dependency), label(state)).inc()


@_safe
def saga_escalated(saga: str) -> None:
    _metric("escalations").labels(label(saga)).inc()


@_safe
def worker_heartbeat(hostname: str) -> None:
    """The worker ``hostname`` (Celery's ``name@host``) is alive: its housekeeping timers run.

    Called by the worker's main process every ``HEARTBEAT_INTERVAL_SECONDS``; alert on the
    age of the timestamp (deploy/prometheus/alerts.yml, RecoveryWorkerHeartbeatMissing).
    """
    _metric("heartbeat").labels(label(hostname)).set(time.time())


@_safe
def incident_opened(reason: str, severity: str) -> None:
    _metric("incidents_opened").labels(label(reason), label(severity)).inc()


@_safe
def incident_resolved(reason: str) -> None:
    _metric("incidents_resolved").labels(label(reason)).inc()


@_safe
def notification_outcome(channel: str, outcome: str) -> None:
    _metric("notifications").labels(label(channel), label(outcome)).inc()


# -- receivers of recovery.events (connected by recovery.subscriptions) -----------------------
# Each counts only while "prometheus" is in RECOVERY["METRICS_BACKENDS"] (the default).


@counted_by(PROMETHEUS)
def count_task_failed(task_name: str, kind: str, transient: bool, **_: Any) -> None:
    task_failed(task_name, kind, transient)


@counted_by(PROMETHEUS)
def count_retry_scheduled(task_name: str, kind: str, **_: Any) -> None:
    retry_scheduled(task_name, kind)


@counted_by(PROMETHEUS)
def count_fallback(task_name: str, reason: str, succeeded: bool, **_: Any) -> None:
    (fallback_used if succeeded else fallback_failed)(task_name, reason)


@counted_by(PROMETHEUS)
def count_parked(record: Any, first_report: bool = True, **_: Any) -> None:
    # A spooled letter was counted when it was spooled, not again when the drain writes it.
    if first_report:
        dead_letter_parked(record.task_name, record.kind, record.replay)
        if getattr(record, "rehearsal", ""):
            rehearsal_parked(record.rehearsal, record.task_name)


@counted_by(PROMETHEUS)
def count_rehearsal_injected(rehearsal: str, task_name: str, fault: str, **_: Any) -> None:
    rehearsal_injected(rehearsal, task_name, fault)


@counted_by(PROMETHEUS)
def count_deferred(kind: str, **_: Any) -> None:
    write_deferred(kind)


@counted_by(PROMETHEUS)
def count_internal_error(task_name: str, error_type: str, **_: Any) -> None:
    internal_error(task_name, error_type)


@counted_by(PROMETHEUS)
def count_replays(outcome: str, count: int = 1, **_: Any) -> None:
    replay_outcome(outcome, count)


@counted_by(PROMETHEUS)
def count_compensation(outcome: str, **_: Any) -> None:
    compensation_outcome(outcome)


@counted_by(PROMETHEUS)
def record_circuit(dependency: str, state: str, **_: Any) -> None:
    circuit_changed(dependency, state)


@counted_by(PROMETHEUS)
def record_heartbeat(hostname: str, **_: Any) -> None:
    worker_heartbeat(hostname)


# -- backlogs, read at scrape time ------------------------------------------------------------


class SpoolCollector:
    """``recovery_spool_backlog``: dead letters waiting in this host's spool directory;
    ``recovery_spool_quarantined``: records there the drain set aside as never writable
    (``*.bad``), each the only copy of a failed task, waiting for a human."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("recovery_collector_up",
                               "1 when the backlog source could be read at this scrape.",
                               labels=["source"])
        try:
            spool = Spool(conf.spool_dir())
            count, quarantined = len(spool), spool.quarantined()
        except Exception:  # noqa: BLE001
            logger.warning("recovery: could not count the spool", exc_info=True)
            up.add_metric(["spool"], 0)
        else:
            up.add_metric(["spool"], 1)
            yield GaugeMetricFamily("recovery_spool_backlog",
                                    "Dead letters in the local spool, waiting for the database.",
                                    value=count)
            yield GaugeMetricFamily("recovery_spool_quarantined",
                                    "Spooled records the drain can never write, set aside as "
                                    "*.bad for a human.", value=quarantined)
        yield up


class _Merged:
    """Several collectors as one, so families of the same name (collector_up) merge."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = None
        for collector in self.collectors:
            for family in collector.collect():
                if family.name == "recovery_collector_up":
                    if up is None:
                        up = GaugeMetricFamily(family.name, family.documentation,
                                               labels=["source"])
                    up.samples.extend(family.samples)
                else:
                    yield family
        if up is not None:
            yield up


_scrape_cache: dict[str, tuple[float, list[Any]]] = {}


class Cached:
    """A scrape-time collector whose families the next scrapes of this process reuse for
    ``RECOVERY["METRICS_CACHE_SECONDS"]``: several Prometheus replicas (or a dashboard)
    scraping cost one set of database queries per window. A reading with a source down is
    not kept, so the next scrape tries again."""

    def __init__(self, key: str, collector: Any) -> None:
        self.key, self.collector = key, collector

    def collect(self) -> Iterator[Any]:
        seconds = conf.get("METRICS_CACHE_SECONDS") or 0
        now = time.monotonic()
        kept = _scrape_cache.get(self.key)
        if kept is not None and now - kept[0] < seconds:
            yield from kept[1]
            return
        families = list(self.collector.collect())
        if seconds > 0 and all(sample.value == 1 for family in families
                               if family.name == "recovery_collector_up"
                               for sample in family.samples):
            _scrape_cache[self.key] = (now, families)
        yield from families


class _Events:
    """The event metrics: from the multiprocess files, or from this process's registry."""

    def collect(self) -> Iterator[Any]:
        path = multiprocess_dir()
        if path is not None:
            from prometheus_client import CollectorRegistry, multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)
            yield from registry.collect()
        elif _local_registry is not None:
            yield from _local_registry.collect()


def registry(*, backlogs: Sequence[Any] = (), database: bool = False) -> Any:
    """A registry to expose: the event metrics, the spool backlog and ``backlogs``, more
    scrape-time collectors (the Django view adds the database's and the shared circuit
    states: :func:`recovery.observe.backlogs.exposition`). ``database=True`` is 0.1's
    spelling of that, kept for one release."""
    if database:
        backlogs = [*backlogs, *_database_backlogs("registry")]
    from prometheus_client import CollectorRegistry

    collectors: list[Any] = [*backlogs, SpoolCollector()]
    result = CollectorRegistry(auto_describe=False)
    result.register(_Events())
    result.register(_Merged(*collectors))
    return result


def exposition(*, backlogs: Sequence[Any] = (), database: bool = False) -> tuple[bytes, str]:
    """(body, content type) of a scrape in the Prometheus text format. ``database=True``
    is 0.1's spelling of :func:`recovery.observe.backlogs.exposition`, kept for one
    release."""
    if database:
        backlogs = [*backlogs, *_database_backlogs("exposition")]
    from prometheus_client import exposition as text_format

    # The 0.0.4 text format: every recovery_* name is a classic one, and every Prometheus
    # 2.x and 3.x server reads it.
    content_type = getattr(text_format, "CONTENT_TYPE_PLAIN_0_0_4",
                           text_format.CONTENT_TYPE_LATEST)
    return text_format.generate_latest(registry(backlogs=backlogs)), content_type


def _database_backlogs(caller: str) -> list[Any]:
    warnings.warn(f"{public_module(__name__)}.{caller}(database=True) moved to "
                  "recovery.observe.backlogs.exposition(); the argument goes in the next "
                  "release", MovedModuleWarning, stacklevel=3)
    # Named at run time: backlogs reads the database and builds on this module.
    return importlib.import_module("recovery.observe.backlogs").database_backlogs()


# -- prefork workers --------------------------------------------------------------------------

_owned_dir: str | None = None
_server: Any = None


def ensure_multiprocess_dir() -> str:
    """Make sure this process and the pool children it forks count into one directory.

    Keeps ``PROMETHEUS_MULTIPROC_DIR`` when it is set (the deployer empties it before the
    worker starts); otherwise creates a private one for this worker and sets the variable,
    which the children inherit. Call it in the worker's main process before the pool starts
    (``recovery.setup`` does, at ``worker_init``).
    """
    global _owned_dir
    path = multiprocess_dir()
    if path is None:
        _remove_stale_private_dirs()
        path = tempfile.mkdtemp(prefix=f"recovery-metrics-{os.getpid()}-")
        os.environ[MULTIPROC_ENV] = path
        _owned_dir = path
    else:
        os.makedirs(path, exist_ok=True)
    _reset()
    return path


def _remove_stale_private_dirs() -> None:
    """Remove private directories of workers that died without shutting down (SIGKILL)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "recovery-metrics-*-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue


def mark_process_dead(pid: int) -> None:
    """A pool child exited: drop its live gauges (its counters stay counted). Never raises."""
    path = multiprocess_dir()
    if path is None:
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
    except Exception:  # noqa: BLE001
        logger.debug("recovery: could not mark metrics process %s dead", pid, exc_info=True)


def start_worker_server(port: int, address: str = "127.0.0.1") -> Any:
    """Serve this worker's metrics (all its pool children's, summed) on ``port``, on
    loopback unless ``address`` says otherwise (``RECOVERY["METRICS_ADDRESS"]``)."""
    global _server
    from prometheus_client import start_http_server

    if _server is not None:
        return _server
    server, _thread = start_http_server(int(port), addr=address, registry=registry())
    _server = server
    logger.info("recovery: metrics served on http://%s:%s/metrics", address, port)
    return server


def stop_worker_server() -> None:
    """Stop the endpoint and remove the private multiprocess directory, if this worker made one."""
    global _server, _owned_dir
    server, _server = _server, None
    if server is not None:
        try:
            server.shutdown()
            server.server_close()
        except Exception:  # noqa: BLE001
            logger.debug("recovery: could not stop the metrics server", exc_info=True)
    path, _owned_dir = _owned_dir, None
    if path is not None and os.environ.get(MULTIPROC_ENV) == path:
        shutil.rmtree(path, ignore_errors=True)
