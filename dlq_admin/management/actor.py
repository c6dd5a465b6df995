"""Who acted, for the audit trail of the ``manage.py`` commands."""

from __future__ import annotations

import getpass

__all__ = ["cli_actor"]


def cli_actor() -> str:
    """``cli:<shell user>``, or ``cli`` where the user has no name (some containers)."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - getpass raises several kinds when there is no user
        return "cli"
