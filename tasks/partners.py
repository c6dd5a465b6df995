"""Example workflows for dependencies that are down for a while.

- ``fetch_partner_quote``: a flaky partner API behind the circuit breaker ``"partner-api"``
  (``RECOVERY["CIRCUITS"]``), with the backup quote service as its fallback. When its
  policy gives up, or while the circuit is open, the backup's (delayed) quote is the
  task's result and the degradation is recorded (``FallbackUse``).
- ``sales_report``: a monthly report that writes its figures to a cache; in read-only mode
  (``manage.py degraded on read-only``) it serves the cached copy instead.

The services are local stand-ins (``tasks.partner_services``) that the demo switches
down and up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import shared_task

from recovery import RecoveryTask, RetryPolicy
from recovery.workflows import degraded
from recovery.workflows.circuit import Circuit

from . import partner_services as services

QUOTE_POLICY = RetryPolicy(max_attempts=3, initial_delay_seconds=0.3, multiplier=2.0,
                           max_delay_seconds=1.0, jitter="full")
REPORT_POLICY = RetryPolicy(max_attempts=3, initial_delay_seconds=0.5, max_delay_seconds=2.0)


def quote_from_backup(symbol: str, failure: dict | None = None) -> dict:
    """``fetch_partner_quote``'s fallback: the backup quote service (delayed prices, but
    up when the partner is not). Same arguments, plus why it stands in."""
    answer = services.call("backup-quotes", f"/quotes/{symbol}")
    return {"symbol": symbol, "price": answer["value"], "source": "backup",
            "degraded": (failure or {}).get("reason")}


@shared_task(base=RecoveryTask, bind=True, retry_policy=QUOTE_POLICY, dependency="partner-api",
             when_circuit_open="fallback", fallback=quote_from_backup)
def fetch_partner_quote(self, symbol: str) -> dict:
    """A live quote from the partner API; the backup's quote when the partner is down."""
    answer = services.call("partner-api", f"/quotes/{symbol}")
    return {"symbol": symbol, "price": answer["value"], "source": "partner", "degraded": None}


def cached_sales_report(month: str, failure: dict | None = None) -> dict:
    """``sales_report``'s fallback: the figures it computed last time, if any."""
    cached = services.cached_report(month)
    return {"month": month, "figures": cached.get("figures"), "as_of": cached.get("as_of"),
            "source": "cache", "degraded": (failure or {}).get("reason")}


@shared_task(base=RecoveryTask, bind=True, retry_policy=REPORT_POLICY,
             degraded_mode="read-only", when_degraded="fallback", fallback=cached_sales_report)
def sales_report(self, month: str) -> dict:
    """Computes the month's figures from the warehouse and caches them (a write, which is
    why read-only mode serves the cached copy instead)."""
    answer = services.call("warehouse", f"/sales/{month}")
    figures = {"revenue": answer["value"] * 1000, "orders": int(answer["value"] * 10)}
    services.cache_report(month, figures)
    return {"month": month, "figures": figures, "source": "live", "degraded": None}


def run_demo(run: Callable[..., Any]) -> list[tuple[str, str, str]]:
    """The resilience part of ``manage.py demo``, step by step; returns rows of (task,
    arguments, outcome). ``run(task, *args)`` sends a task and returns its result.

    The partner API is left down and its circuit open, for the admin
    (``/admin/recovery/sharedstate/``) and ``manage.py circuits`` to show.
    """
    services.reset()
    Circuit("partner-api").reset()
    degraded.switch("read-only", False, actor="demo", reason="demo start")
    rows = []

    def quote(symbol: str) -> None:
        before = services.calls("partner-api")
        value = run(fetch_partner_quote, symbol)
        called = services.calls("partner-api") - before
        if value["degraded"] == "gave_up":
            outcome = f"backup quote: partner failed {called} attempts (503)"
        elif value["degraded"] == "circuit_open":
            outcome = ("backup quote: circuit open, partner not called" if not called else
                       f"backup quote: circuit open, partner called {called} times")
        else:
            outcome = "partner quote"
        rows.append(("fetch_partner_quote", repr(symbol), outcome))

    def report(month: str) -> None:
        value = run(sales_report, month)
        outcome = ("live figures, cached" if value["source"] == "live" else
                   f"cached figures as of {value['as_of']} (read-only mode)")
        rows.append(("sales_report", repr(month), outcome))

    quote("ACME")                                   # partner up
    services.set_mode("partner-api", "down")
    quote("GLOBEX")                                 # 3 failures: policy gives up, circuit opens
    quote("INITECH")                                # circuit open: straight to the backup
    report("2026-10")                               # computed and cached
    degraded.switch("read-only", True, actor="demo", reason="database failover drill")
    try:
        report("2026-10")                           # served from the cache
    finally:
        degraded.switch("read-only", False, actor="demo", reason="drill over")
    return rows
