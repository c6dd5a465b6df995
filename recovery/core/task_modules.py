"""Find a project's tasks outside a worker.

The admin, ``manage.py`` and the watchdog need a task by name (to validate a replay's
payload, or to know which argument is a secret), but Celery imports task modules lazily
outside a worker. :func:`import_task_modules` imports them the way a worker does.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["import_task_modules"]

_IMPORTING = threading.RLock()


def import_task_modules(app: Any) -> None:
    """Import the project's task modules the way a worker does.

    Serialised: while one thread is in Celery's autodiscovery, a second one returns at
    once (``celery.loaders.base._RACE_PROTECTION``) and would find the tasks missing.
    """
    with _IMPORTING:
        app.loader.import_default_modules()
