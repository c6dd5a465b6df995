"""Recover from a database that restarted under us.

After PostgreSQL restarts, every connection a thread holds is dead, and Django only
notices at the next request boundary, which a worker thread never reaches. Each of
recovery's writes that meets a broken connection calls :func:`discard_broken_connections`
and tries once more on a fresh one before spooling.
"""

from __future__ import annotations

from django.db import close_old_connections, connections

__all__ = ["discard_broken_connections"]


def discard_broken_connections() -> None:
    """Drop connections the database has broken, so the next query reconnects."""
    try:
        close_old_connections()
    except Exception:  # noqa: BLE001 - closing a dead connection may itself fail
        pass
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and not connection.in_atomic_block:
            try:
                if not connection.is_usable():
                    connection.close()
            except Exception:  # noqa: BLE001
                pass
