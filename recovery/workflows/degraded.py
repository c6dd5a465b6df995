"""Degraded-mode switches: named modes (``"read-only"``, ``"no-email"``) that operators
flip and code checks, shared by every worker (``recovery.workflows.shared_state``).

A task can declare what it does while a mode is on (``degraded_mode="read-only"``,
``when_degraded="defer"`` or ``"fallback"``); any code can ask ``is_on("read-only")``.
A store that cannot be read counts as "off": the switch is an operator's tool, an
outage of it must not stop work.
"""

from __future__ import annotations

from datetime import datetime, timezone

from . import shared_state
from ..core.names import logger_for

__all__ = ["is_on", "switch", "status", "MODES_KEY"]

logger = logger_for(__name__)

#: the record listing every mode ever switched, so operators can see them all
MODES_KEY = "degraded"


def is_on(mode: str) -> bool:
    try:
        return bool(shared_state.store().get(MODES_KEY).get(mode, {}).get("on"))
    except Exception as exc:  # noqa: BLE001 - fail to "off"
        logger.warning("recovery: degraded mode %s unreadable (%s); treating it as off", mode, exc)
        return False


def switch(mode: str, on: bool, *, actor: str = "system", reason: str = "") -> dict:
    """Turn ``mode`` on or off; returns its new record (who, when, why)."""
    entry = {"on": bool(on), "actor": actor, "reason": reason,
             "since": datetime.now(timezone.utc).isoformat()}

    def change(record: dict) -> None:
        record[mode] = entry

    shared_state.store().update(MODES_KEY, change)
    logger.warning("recovery: degraded mode %s switched %s by %s%s", mode, "on" if on else "off",
                   actor, f": {reason}" if reason else "")
    return entry


def status() -> dict[str, dict]:
    """Every known mode and its record."""
    return dict(shared_state.store().get(MODES_KEY))
