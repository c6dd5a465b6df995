"""The CloudWatch backend's receivers of :mod:`recovery.events`, and its one buffer per
process.

Each ``count_*`` receiver mirrors the Prometheus one of the same name in
:mod:`recovery.observe.metrics`: the same event, the same bounded labels (it reuses
their task-label rules, so a forged task name is ``unregistered`` in both), as
dimensions. They run only while ``"cloudwatch-emf"`` is in
``RECOVERY["METRICS_BACKENDS"]``, add to the process's :class:`~.buffer.Buffer` and
return; nothing here raises to the event (a failure is logged once per process, then at
debug level).

Processes and their buffers:

* Each process sums its own counts. A process forked from one that holds counts (a
  prefork pool child) starts empty, so nothing is published twice; the fork also drops
  the parent's thread and client, which the child makes again when it first counts.
* A worker's main process publishes what is left when its housekeeping stops
  (``worker_stopping``); a pool child when it exits (``worker_process_shutdown``,
  connected by ``recovery.setup``); any other process (web, ``manage.py``) at exit.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any, NamedTuple

from celery import current_app

from ... import conf
from ...core.names import logger_for
from ..backends import CLOUDWATCH_EMF, counted_by
from ..metrics import label, ran_task_label, task_label
from . import families
from .buffer import Buffer
from .emf import Family, dimension_value
from .options import CloudWatchOptions, current
from .sinks import sink_for

__all__ = ["count_task_failed", "count_retry_scheduled", "count_fallback", "count_parked",
           "count_deferred", "count_internal_error", "count_replays", "count_compensation",
           "record_circuit", "record_heartbeat", "stop_publishing", "flush", "queue_label",
           "worker_label", "buffer", "UNKNOWN_QUEUE"]

logger = logger_for(__name__)

#: The ``Queue`` of a run delivered with a routing key that is none of the app's queues
#: (or with none: an eager run), so a made-up routing key adds no metric.
UNKNOWN_QUEUE = "unknown"


class _Process(NamedTuple):
    pid: int
    setting: Any
    options: CloudWatchOptions
    buffer: Buffer


_lock = threading.Lock()
_process: _Process | None = None
_warned = False


def buffer() -> Buffer:
    """This process's buffer, made (or made again) for the current ``RECOVERY["CLOUDWATCH"]``.

    Raises ValueError when the setting is invalid (``recovery.E041`` says so at start-up).
    """
    global _process
    from_settings = _settings()
    found = _process
    if found is not None and found.pid == os.getpid() and found.setting == from_settings:
        return found.buffer
    with _lock:
        found = _process
        if found is not None and found.pid == os.getpid() and found.setting == from_settings:
            return found.buffer
        options = current()
        made = Buffer(sink_for(options), interval_seconds=options.flush_interval_seconds,
                      max_series=options.max_buffered_series)
        _process = _Process(os.getpid(), from_settings, options, made)
    if found is not None and found.pid == os.getpid():
        # The setting changed (override_settings in a test; a deployment's settings do not
        # change while it runs): what the old buffer held goes out its way, now.
        _quietly(found.buffer.stop, 0)
    return made


def _settings() -> Any:
    value = conf.get("CLOUDWATCH")
    # A copy: a dict changed in place is a changed setting.
    return dict(value) if isinstance(value, dict) else value


def flush() -> int:
    """Publish what this process holds, now; returns the number of series. Never raises."""
    found = _process
    if found is None or found.pid != os.getpid():
        return 0
    return _quietly(found.buffer.flush) or 0


def stop_publishing(hostname: str = "", timeout_seconds: float = 10.0, **_: Any) -> None:
    """On ``worker_stopping``: stop this process's flush thread and publish what is left,
    whichever backends are listed now (what was counted was counted while it was on)."""
    global _process
    found = _process
    if found is not None and found.pid == os.getpid():
        with _lock:
            if _process is found:
                _process = None  # a count after this starts a new buffer
        _quietly(found.buffer.stop, timeout_seconds)


def _quietly(action: Any, *args: Any) -> Any:
    try:
        return action(*args)
    except Exception:  # noqa: BLE001 - metrics never stop a worker or a task
        _warn_once("could not publish CloudWatch metrics")
        return None


def _warn_once(what: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("recovery: %s (further failures are logged at debug level)", what,
                       exc_info=True)
    else:
        logger.debug("recovery: %s", what, exc_info=True)


def _record(family: Family, *values: Any, amount: float = 1.0) -> None:
    try:
        buffer().add((family, tuple(dimension_value(value) for value in values)), amount)
    except Exception:  # noqa: BLE001 - a broken exporter never fails the task
        _warn_once(f"CloudWatch metric {family.name} failed")


def queue_label(routing_key: Any) -> str:
    """The ``Queue`` of a run: its routing key when that is one of the app's queues (by
    name or routing key), else :data:`UNKNOWN_QUEUE`. Anyone who can publish chooses the
    routing key; the app's queues are few."""
    text = label(routing_key)
    if not text:
        return UNKNOWN_QUEUE
    try:
        queues = current_app.amqp.queues
        known = text in queues or any(queue.routing_key == text for queue in queues.values())
    except Exception:  # noqa: BLE001 - an app that cannot list its queues knows none
        known = False
    return text if known else UNKNOWN_QUEUE


def worker_label(hostname: Any) -> str:
    """``w1`` of ``w1@host-7f3a``: a worker's node name, which a replaced container keeps."""
    text = label(hostname)
    return text.partition("@")[0] or text


# -- receivers (connected by recovery.subscriptions) ------------------------------------------


@counted_by(CLOUDWATCH_EMF)
def count_task_failed(task_name: str, kind: str, transient: bool, queue: str = "",
                      **_: Any) -> None:
    _record(families.TASK_FAILURES, ran_task_label(task_name), label(kind), queue_label(queue))


@counted_by(CLOUDWATCH_EMF)
def count_retry_scheduled(task_name: str, kind: str, queue: str = "", **_: Any) -> None:
    _record(families.RETRIES, ran_task_label(task_name), label(kind), queue_label(queue))


@counted_by(CLOUDWATCH_EMF)
def count_fallback(task_name: str, reason: str, succeeded: bool, queue: str = "",
                   **_: Any) -> None:
    family = families.FALLBACKS if succeeded else families.FALLBACK_FAILURES
    _record(family, ran_task_label(task_name), label(reason), queue_label(queue))


@counted_by(CLOUDWATCH_EMF)
def count_parked(record: Any, first_report: bool = True, **_: Any) -> None:
    # A spooled letter was counted when it was spooled, not again when the drain writes it.
    if not first_report:
        return
    _record(families.DEAD_LETTERS_PARKED, task_label(record.task_name), label(record.kind),
            queue_label(record.queue))
    if record.replay:
        _record(families.REPLAYS, "parked_again")


@counted_by(CLOUDWATCH_EMF)
def count_deferred(kind: str, **_: Any) -> None:
    _record(families.DEFERRED_WRITES, label(kind))


@counted_by(CLOUDWATCH_EMF)
def count_internal_error(task_name: str, error_type: str, **_: Any) -> None:
    _record(families.INTERNAL_ERRORS, task_label(task_name), label(error_type))


@counted_by(CLOUDWATCH_EMF)
def count_replays(outcome: str, count: int = 1, **_: Any) -> None:
    if count > 0:
        _record(families.REPLAYS, label(outcome), amount=float(count))


@counted_by(CLOUDWATCH_EMF)
def count_compensation(outcome: str, **_: Any) -> None:
    _record(families.COMPENSATIONS, label(outcome))


@counted_by(CLOUDWATCH_EMF)
def record_circuit(dependency: str, state: str, **_: Any) -> None:
    _record(families.CIRCUIT_TRANSITIONS, label(dependency), label(state))


@counted_by(CLOUDWATCH_EMF)
def record_heartbeat(hostname: str, **_: Any) -> None:
    _record(families.WORKER_HEARTBEATS, worker_label(hostname))


# -- processes --------------------------------------------------------------------------------


def _forget_inherited() -> None:
    """In a forked child: the parent's counts, thread and client are the parent's."""
    global _process, _lock, _warned
    _process, _lock, _warned = None, threading.Lock(), False


os.register_at_fork(after_in_child=_forget_inherited)
atexit.register(flush)
