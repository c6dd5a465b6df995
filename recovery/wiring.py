"""recovery.setup(app): install the runtime into a Celery app in one call.

Explicit rather than automatic: ``recovery`` never imports the project's
Celery app, so the project says once, where it builds its app::

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    recovery.setup(app)
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery, current_app, signals
from django.db import close_old_connections

from . import conf
from .core.task_modules import import_task_modules
from .core.brokers import REDIS, broker_kind
from .delivery import redis_fetch, topology
from .observe import metrics
from .observe.cloudwatch import receivers as cloudwatch
from .store.db_timeouts import unbound_thread_connection

__all__ = ["setup", "CONSUMER", "import_task_modules"]

CONSUMER = "recovery.delivery.worker:RecoveryConsumer"
HANDBACK = "recovery.delivery.handback:HandBack"
PRESENCE = "recovery.delivery.presence:Presence"
# By name: the steps' modules import the models, and setup() may run before Django is.
HOUSEKEEPING = "recovery.delivery.housekeeping:Housekeeping"
BROKER_DEAD_LETTERS = "recovery.delivery.broker_dead_letters:BrokerDeadLetters"
SQS_DEAD_LETTERS = "recovery.delivery.sqs_dead_letters:SqsDeadLetters"
# Queues created on demand get the declared queues' delivery limit on RabbitMQ.
DEFAULT_AMQP = "celery.app.amqp:AMQP"
PROTECTED_AMQP = "recovery.delivery.topology:ProtectedAMQP"
_REUSE_FOREVER = 2**31


def setup(app: Celery) -> Celery:
    """Install the poison-parking consumer, the housekeeping timers, the hand-back of
    unused deliveries on shutdown, the live-worker stamp the watchdog reads, the broker's
    topology (:mod:`recovery.delivery.topology`) and the drain of its dead letters
    (RabbitMQ's dead-letter exchange, SQS's redrive),
    database connection reuse and the watchdog's Celery beat entry.
    Returns ``app``."""
    app.conf.update(
        worker_consumer=CONSUMER,
        # Celery's Django fixup closes the database connection around every task
        # (measured: 5,000 tasks opened 5,001 PostgreSQL sessions, ~61 tasks/s vs ~215 with
        # reuse). Reuse instead, and let Django's own rules (CONN_MAX_AGE, health
        # checks, broken connections) decide when to reconnect: see _reuse_connection.
        CELERY_DB_REUSE_MAX=_REUSE_FOREVER,
    )
    if app.amqp_cls == DEFAULT_AMQP and "amqp" not in vars(app):
        app.amqp_cls = PROTECTED_AMQP
    for step in (HOUSEKEEPING, HANDBACK, PRESENCE, BROKER_DEAD_LETTERS, SQS_DEAD_LETTERS):
        if step not in app.steps["consumer"]:
            app.steps["consumer"].add(step)

    def _broker_topology(sender: Any = None, **kwargs: Any) -> None:
        topology.apply(sender.conf)

    if app.configured:
        # The configuration was read already (app.conf touched before setup):
        # on_after_configure has fired and will not fire again.
        _broker_topology(app)
        _watchdog_schedule(app)
    else:
        app.on_after_configure.connect(_broker_topology, weak=False)
        app.on_after_configure.connect(_watchdog_schedule, weak=False)
    _INSTALLED.add(app)
    # Survives pickling (a pool child started with `spawn` gets a copy of the app).
    app.conf.update({INSTALLED_FLAG: True})
    for signal, receiver, uid in _WORKER_RECEIVERS:
        signal.connect(_SCOPED[uid], weak=False, dispatch_uid=uid)
    return app


#: The apps :func:`setup` installed into. Celery's signals are process-wide: its receivers
#: act for these apps' workers and tasks only, so another app in the same process (a
#: plain app beside the project's, the stock baseline in bench/) keeps stock Celery:
#: kombu's own Redis fetch, Celery's own connection handling.
_INSTALLED: "weakref.WeakSet[Celery]" = weakref.WeakSet()


#: The configuration key setup() sets: a pickled copy of the app (a pool child started
#: with `spawn`) is a new object, not in _INSTALLED, and carries its configuration.
INSTALLED_FLAG = "recovery_installed"


def _app_of(sender: Any) -> Any:
    app = getattr(sender, "app", None)
    if app is None:
        # worker_process_init/shutdown are sent by a pool child with its hostname: its
        # current app is its worker's (Celery's process initializer makes it so first).
        app = current_app._get_current_object()
    return app


def _installed(app: Any) -> bool:
    if app in _INSTALLED:
        return True
    try:
        flagged = bool(app.conf.get(INSTALLED_FLAG))
    except Exception:  # noqa: BLE001 - not an app, or one that cannot read its configuration
        return False
    if flagged:
        _INSTALLED.add(app)
    return flagged


def _for_installed_apps(receiver: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(receiver)
    def scoped(sender: Any = None, **kwargs: Any) -> None:
        if _installed(_app_of(sender)):
            receiver(sender=sender, **kwargs)

    return scoped


def _reliable_fetch(sender: Any = None, **kwargs: Any) -> None:
    """On Redis, a worker takes each message and records it as held in one step
    (:mod:`recovery.delivery.redis_fetch`): killed in between, it would lose it."""
    app = getattr(sender, "app", None)
    if app is not None and broker_kind(app.conf.broker_url) == REDIS:
        redis_fetch.install()


WATCHDOG_ENTRY = "recovery-watchdog"


def _watchdog_schedule(sender: Any = None, **kwargs: Any) -> None:
    """Have workers register the task ``recovery.watchdog`` (``recovery.observe.watchdog``)
    and Celery beat run it every
    ``RECOVERY["WATCHDOG"]["INTERVAL_SECONDS"]`` (None: no entry). A ``beat_schedule``
    entry of the project's own named ``recovery-watchdog`` is left as it is; so is
    django-celery-beat's copy in the database, which it takes from ``beat_schedule``.

    Runs when the app's configuration is read, maybe before Django's apps are ready: it
    names the module (imported with the task modules) instead of importing it. A bad
    value is reported by ``manage.py check`` (``recovery.E016``).
    """
    include = tuple(sender.conf.include or ())
    if "recovery.observe.watchdog" not in include:
        sender.conf.include = (*include, "recovery.observe.watchdog")
    user = conf.get("WATCHDOG")
    merged = {**conf.DEFAULTS["WATCHDOG"], **(user if isinstance(user, dict) else {})}
    interval = merged.get("INTERVAL_SECONDS")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        return
    schedule = dict(sender.conf.beat_schedule or {})
    schedule.setdefault(WATCHDOG_ENTRY, {
        "task": "recovery.watchdog",
        "schedule": float(interval),
        # A sweep that could not start within one interval is superseded by the next.
        "options": {"expires": float(interval)},
    })
    sender.conf.beat_schedule = schedule


def _unbound_child_connection(sender: Any = None, **kwargs: Any) -> None:
    """A pool child forked after the consumer bounded its connection (recovery.store.db_timeouts)
    runs the project's tasks on the project's database settings, unchanged."""
    unbound_thread_connection()


def _metrics_worker_init(sender: Any = None, **kwargs: Any) -> None:
    """In the worker's main process, before the pool forks: one multiprocess metrics
    directory for the worker and its children, and the endpoint if METRICS_PORT is set."""
    try:
        metrics.ensure_multiprocess_dir()
        port = conf.get("METRICS_PORT")
        if port:
            metrics.start_worker_server(int(port), conf.get("METRICS_ADDRESS") or "127.0.0.1")
    except Exception:  # noqa: BLE001 - metrics never stop a worker from starting
        logging.getLogger(__name__).exception("recovery: could not set up worker metrics")


def _metrics_child_exit(sender: Any = None, pid: int | None = None, **kwargs: Any) -> None:
    """A pool child is exiting (in the child): its live gauges go, and the CloudWatch
    counts it still holds are published (it leaves by ``os._exit``: no ``atexit``)."""
    metrics.mark_process_dead(pid or os.getpid())
    cloudwatch.flush()


def _metrics_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    metrics.stop_worker_server()


def _reuse_connection(sender: Any = None, **kwargs: Any) -> None:
    """What Django does at the start of a request: drop only unusable or expired connections.

    Not for eager calls: they run inside the caller's transaction (a test, a view).
    """
    request = getattr(sender, "request", None)
    if getattr(request, "is_eager", False):
        return
    close_old_connections()




_WORKER_RECEIVERS: tuple[tuple[Any, Callable[..., None], str], ...] = (
    (signals.task_prerun, _reuse_connection, "recovery-db-reuse"),
    (signals.worker_process_init, _unbound_child_connection, "recovery-db-unbound-child"),
    (signals.worker_init, _reliable_fetch, "recovery-redis-fetch"),
    (signals.worker_init, _metrics_worker_init, "recovery-metrics-init"),
    (signals.worker_process_shutdown, _metrics_child_exit, "recovery-metrics-child-exit"),
    (signals.worker_shutdown, _metrics_worker_shutdown, "recovery-metrics-shutdown"),
)
#: One scoped receiver per signal, made once: connecting it again (a second setup) is a no-op.
_SCOPED = {uid: _for_installed_apps(receiver) for _signal, receiver, uid in _WORKER_RECEIVERS}
