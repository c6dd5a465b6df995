"""What operators see of circuit breakers and degraded modes: the known ones and their state.

Shared by the admin (``resilience_admin``) and the ``circuits`` / ``degraded`` commands.
A circuit is known when ``RECOVERY["CIRCUITS"]`` configures it or a registered task
declares it (``dependency=``); a degraded mode when it was ever switched or a task
declares it (``degraded_mode=``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from recovery import conf
from recovery.workflows import degraded
from recovery.workflows.circuit import OPEN, Circuit, CircuitPolicy, window_counts

__all__ = ["CircuitRow", "ModeRow", "known_circuits", "known_modes", "circuit_rows",
           "mode_rows", "NAME"]

logger = logging.getLogger(__name__)

#: what a circuit or mode name may look like (it travels in URLs and shell arguments)
NAME = re.compile(r"^[\w.:-]{1,100}$")


def _declared(attribute: str) -> set[str]:
    """Values of a task option across every registered task of the current Celery app."""
    from celery import current_app

    try:
        current_app.loader.import_default_modules()  # the worker's autodiscovery
    except Exception as exc:  # noqa: BLE001 - list what is known rather than fail the page
        logger.warning("could not import the Celery task modules: %s", exc)
    names = set()
    for task in list(current_app.tasks.values()):
        value = getattr(task, attribute, None)
        if isinstance(value, str) and value:
            names.add(value)
    return names


def known_circuits() -> list[str]:
    configured = {name for name in (conf.get("CIRCUITS") or {}) if name != "default"}
    return sorted(configured | _declared("dependency"))


def known_modes(switched: dict | None = None) -> list[str]:
    return sorted(set(switched or {}) | _declared("degraded_mode"))


@dataclass
class CircuitRow:
    name: str
    state: str  # closed | open | half_open | unknown
    open_until: datetime | None = None
    calls: int = 0
    failures: int = 0
    opened: int = 0
    changed_at: datetime | None = None
    policy: CircuitPolicy | None = None
    error: str = ""

    @property
    def trial_due(self) -> bool:
        """Open, but past open_until: the next call will be a trial."""
        return self.state == OPEN and self.open_until is not None and \
            self.open_until <= datetime.now(timezone.utc)

    @property
    def label(self) -> str:
        if self.error:
            return "unknown"
        label = self.state.replace("_", "-")
        return f"{label} (trial due)" if self.trial_due else label


def _moment(value) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if isinstance(value, (int, float)) else None


def circuit_row(name: str) -> CircuitRow:
    try:
        breaker = Circuit(name)
        record = breaker.state()
    except Exception as exc:  # noqa: BLE001 - an unreachable store or a bad policy: say so
        return CircuitRow(name, "unknown", error=f"{type(exc).__name__}: {exc}")
    calls, failures = window_counts(record, time.time(), breaker.policy)
    return CircuitRow(name, record["state"], open_until=_moment(record.get("open_until"))
                      if record["state"] == OPEN else None, calls=calls, failures=failures,
                      opened=int(record.get("opened", 0)), changed_at=_moment(record.get("changed_at")),
                      policy=breaker.policy)


def circuit_rows() -> list[CircuitRow]:
    return [circuit_row(name) for name in known_circuits()]


@dataclass
class ModeRow:
    name: str
    on: bool
    actor: str = ""
    reason: str = ""
    since: str = ""

    @property
    def since_at(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.since)
        except (TypeError, ValueError):
            return None


def mode_rows() -> tuple[list[ModeRow], str]:
    """Every known mode and its switch; and an error if the store cannot be read."""
    try:
        switched = degraded.status()
        error = ""
    except Exception as exc:  # noqa: BLE001
        switched, error = {}, f"{type(exc).__name__}: {exc}"
    rows = []
    for name in known_modes(switched):
        entry = switched.get(name) or {}
        rows.append(ModeRow(name, bool(entry.get("on")), entry.get("actor", ""),
                            entry.get("reason", ""), entry.get("since", "")))
    return rows, error
