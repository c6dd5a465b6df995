"""A task that reports the database settings of the pool child it runs in
(tests/integration/test_housekeeping.py)."""

from __future__ import annotations

import os

from celery import shared_task
from django.db import connection


@shared_task
def connection_settings() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        statement_timeout = cursor.fetchone()[0]
    return {"pid": os.getpid(), "statement_timeout": statement_timeout,
            "options": sorted(connection.settings_dict.get("OPTIONS") or {})}
