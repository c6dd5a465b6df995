"""Local stand-ins for a partner's quote API, its backup service and a sales warehouse,
plus the small cache the monthly report keeps.

``call()`` is what a client library call would be: it answers, or raises what an HTTP
client raises when the service answers 503 (``urllib.error.HTTPError``, which the
classifier counts as a transient dependency failure, so it retries it and counts it
against the circuit). How each service behaves, and how often it was called, live in the
shared state (``recovery.workflows.shared_state``: the database on the embedded demo, Redis
otherwise), so the demo and the tests flip a service from outside the worker::

    partner_services.set_mode("partner-api", "down")
"""

from __future__ import annotations

import zlib
from datetime import datetime, timezone
from email.message import Message
from urllib.error import HTTPError

from recovery.workflows import shared_state

__all__ = ["SERVICES", "call", "set_mode", "mode", "calls", "reset", "cache_report",
           "cached_report"]

SERVICES = ("partner-api", "backup-quotes", "warehouse")
MODES = ("up", "down")


def _key(service: str) -> str:
    return f"standin:{service}"


def set_mode(service: str, mode: str) -> None:
    """Make ``service`` answer (``"up"``) or fail with 503 (``"down"``) from now on."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    shared_state.store().update(_key(service), lambda record: record.update(mode=mode))


def mode(service: str) -> str:
    return shared_state.store().get(_key(service)).get("mode", "up")


def calls(service: str) -> int:
    """Requests ``service`` received since the last ``reset()``."""
    return int(shared_state.store().get(_key(service)).get("calls", 0))


def reset() -> None:
    """Every service up, call counts at zero."""
    for service in SERVICES:
        shared_state.store().update(_key(service),
                                    lambda record: (record.clear(), record.update(mode="up")))


def call(service: str, path: str) -> dict:
    """One request to ``service``: its answer, or ``HTTPError`` 503 while it is down."""

    def count(record: dict) -> str:
        record["calls"] = record.get("calls", 0) + 1
        return record.get("mode", "up")

    current = shared_state.store().update(_key(service), count)
    url = f"https://{service}.example/{path.lstrip('/')}"
    if current == "down":
        raise HTTPError(url, 503, "Service Unavailable", Message(), None)
    # A stable made-up figure per path, so repeated demo runs show the same numbers.
    figure = zlib.crc32(path.encode()) % 10_000 / 100
    return {"url": url, "value": figure}


def cache_report(month: str, figures: dict) -> None:
    """Keep the last computed report, to serve while it cannot be recomputed."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    shared_state.store().update(f"report-cache:{month}",
                                lambda record: record.update(figures=figures, as_of=at))


def cached_report(month: str) -> dict:
    """``{"figures": ..., "as_of": ...}``, or ``{}`` if the report was never computed."""
    return shared_state.store().get(f"report-cache:{month}")
