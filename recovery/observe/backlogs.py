"""The backlogs a scrape of the Django view reads: dead letters by status, the oldest parked
letter's age, the outbox, the due-table, open incidents, undelivered notifications, and
every circuit's state as the workers share it.

Separate from :mod:`recovery.observe.metrics` because these read the database: the
worker's own endpoint (and ``recovery.setup``, which runs before Django is) needs only
the event counters. Each source is cached for ``RECOVERY["METRICS_CACHE_SECONDS"]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from celery import current_app
from django.db import DEFAULT_DB_ALIAS
from django.db.models import Count, Min
from django.utils import timezone

from .. import conf
from ..store.models import DeadLetter, DueRetry, Incident, IncidentNotification, SharedState
from ..workflows import shared_state
from ..workflows.circuit import Circuit, CircuitPolicy
from ..workflows.outbox import pending_count
from ..workflows.shared_state import KEY_PREFIX, DatabaseStore, RedisStore
from . import metrics
from .metrics import CIRCUIT_STATE_VALUES, OPEN_STATUSES, Cached
from ..core.names import logger_for

__all__ = ["DatabaseCollector", "CircuitCollector", "database_backlogs", "exposition"]

logger = logger_for(__name__)

_warned: set[str] = set()


def database_backlogs() -> list[Any]:
    """The scrape-time collectors that read the database and the shared circuit states,
    each cached for ``METRICS_CACHE_SECONDS``."""
    return [Cached("database", DatabaseCollector()), Cached("shared_state", CircuitCollector())]


def exposition() -> tuple[bytes, str]:
    """(body, content type) of the Django view's scrape: the event metrics, the spool and
    the database's and shared state's backlogs."""
    return metrics.exposition(backlogs=database_backlogs())


class DatabaseCollector:
    """Backlogs kept in the database: dead letters by status, the oldest parked letter's
    age, the outbox and the due-table, open incidents and undelivered notifications. A
    database error leaves them out of the scrape and sets ``recovery_collector_up{source="database"}`` to 0."""

    def __init__(self, using: str | None = None) -> None:
        self.using = using

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily  # after the multiprocess dir is set

        using = self.using or DEFAULT_DB_ALIAS
        up = GaugeMetricFamily("recovery_collector_up",
                               "1 when the backlog source could be read at this scrape.",
                               labels=["source"])
        try:
            # The open letters only, through their partial index (recovery_dl_open): closed
            # ones grow without bound and a count of them would read the whole table.
            letters = DeadLetter.objects.using(using).filter(status__in=OPEN_STATUSES)
            by_status = dict.fromkeys(OPEN_STATUSES, 0)
            for row in letters.values("status").annotate(n=Count("status")).order_by():
                by_status[row["status"]] = row["n"]
            oldest = letters.filter(status=DeadLetter.Status.PARKED).aggregate(
                oldest=Min("last_failed_at"))["oldest"]
            outbox = pending_count(using)
            due = DueRetry.objects.using(using).count()
            incidents = {(s, v): 0 for s in ("open", "acknowledged")
                         for v in Incident.Severity.values}
            for row in (Incident.objects.using(using)
                        .filter(status__in=(Incident.Status.OPEN, Incident.Status.ACKNOWLEDGED))
                        .values("status", "severity").annotate(n=Count("id")).order_by()):
                incidents[(row["status"], row["severity"])] = row["n"]
            undelivered = (IncidentNotification.objects.using(using)
                           .filter(status=IncidentNotification.Status.PENDING).count())
        except Exception:  # noqa: BLE001 - a scrape must answer while the database is down
            logger.warning("recovery: metrics could not read the database", exc_info=True)
            up.add_metric(["database"], 0)
            yield up
            return
        family = GaugeMetricFamily("recovery_dead_letters", "Open dead letters (parked, "
                                   "replaying) by status.", labels=["status"])
        for status, count in sorted(by_status.items()):
            family.add_metric([status], count)
        yield family
        age = max(0.0, (timezone.now() - oldest).total_seconds()) if oldest else 0.0
        yield GaugeMetricFamily("recovery_dead_letters_oldest_parked_age_seconds",
                                "Seconds since the oldest parked letter was parked (0 if none).",
                                value=age)
        yield GaugeMetricFamily("recovery_outbox_backlog",
                                "Committed outbox intents not yet published.", value=outbox)
        yield GaugeMetricFamily("recovery_due_retries_backlog",
                                "Long-delay retries waiting in the due-table.", value=due)
        family = GaugeMetricFamily("recovery_incidents", "Incidents not yet resolved, by status "
                                   "and severity.", labels=["status", "severity"])
        for (status, severity), count in sorted(incidents.items()):
            family.add_metric([status, severity], count)
        yield family
        yield GaugeMetricFamily("recovery_escalation_notifications_pending",
                                "Incident notifications waiting to be delivered (webhook, "
                                "e-mail).", value=undelivered)
        up.add_metric(["database"], 1)
        yield up


class CircuitCollector:
    """``recovery_circuit_status{dependency}``: each circuit's state in the shared store
    (:mod:`recovery.workflows.shared_state`), the one every worker obeys: 0 closed, 1 half-open,
    2 open. Unlike ``recovery_circuit_state`` (the last change one process made), it is
    true across workers, and shows circuits tripped or reset by hand.

    The circuits are those ``RECOVERY["CIRCUITS"]`` configures (but ``"default"``), those
    a registered task of the current Celery app declares (``dependency=``), and those with
    a record in the store (used through ``recovery.workflows.circuit.guard()`` only); one that never
    had a record is closed. An unreachable store leaves the gauge out of the scrape and
    sets ``recovery_collector_up{source="shared_state"}`` to 0. Only the Django view
    exposes it: every worker would report the same records.
    """

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily  # after the multiprocess dir is set

        up = GaugeMetricFamily("recovery_collector_up",
                               "1 when the backlog source could be read at this scrape.",
                               labels=["source"])
        try:
            store = shared_state.store()
            names = _configured_circuits() | _declared_dependencies() | _stored_circuits(store)
            # The policy plays no part in reading a record: do not build one from settings.
            states = {name: Circuit(name, CircuitPolicy(), store=store).state()["state"]
                      for name in sorted(names)}
        except Exception:  # noqa: BLE001 - a scrape must answer while the store is down
            logger.warning("recovery: metrics could not read the circuits' shared state",
                           exc_info=True)
            up.add_metric(["shared_state"], 0)
            yield up
            return
        family = GaugeMetricFamily("recovery_circuit_status",
                                   "Circuit breaker state per dependency in the state every "
                                   "worker shares: 0 closed, 1 half-open, 2 open.",
                                   labels=["dependency"])
        for name, state in states.items():
            if state in CIRCUIT_STATE_VALUES:
                family.add_metric([metrics.label(name)], CIRCUIT_STATE_VALUES[state])
        yield family
        up.add_metric(["shared_state"], 1)
        yield up


def _configured_circuits() -> set[str]:
    circuits = conf.get("CIRCUITS") or {}
    return {name for name in circuits if isinstance(name, str) and name != "default"}


def _declared_dependencies() -> set[str]:
    """The ``dependency`` of every task registered on the current Celery app."""
    try:
        current_app.loader.import_default_modules()  # the task modules, as a worker imports them
    except Exception:  # noqa: BLE001 - list the tasks already registered rather than none
        if "_declared_dependencies" not in _warned:
            _warned.add("_declared_dependencies")
            logger.warning("recovery: metrics could not import the Celery task modules",
                           exc_info=True)
    names = set()
    for task in list(current_app.tasks.values()):
        value = getattr(task, "dependency", None)
        if isinstance(value, str) and value:
            names.add(value)
    return names


def _stored_circuits(store: Any) -> set[str]:
    """Circuits with a record in the store: one SCAN of its Redis db, or one query."""

    prefix = "circuit:"  # recovery.workflows.circuit.Circuit.key
    if isinstance(store, RedisStore):
        start = len(KEY_PREFIX + prefix)
        return {key.decode("utf-8", "replace")[start:]
                for key in store.client.scan_iter(match=f"{KEY_PREFIX}{prefix}*", count=1000)}
    if isinstance(store, DatabaseStore):

        return {key[len(prefix):] for key in SharedState.objects
                .filter(key__startswith=prefix).values_list("key", flat=True)}
    return set()
