"""What the architecture tests read: recovery's modules and their imports, once a session.

Migrations are left out: they are Django's frozen history of the tables, written by
``makemigrations``, and import only Django.
"""

from __future__ import annotations

import pytest

from recovery.moved import MOVED

from .imports import Import, Source, all_imports, sources


@pytest.fixture(scope="session")
def recovery_modules() -> dict[str, Source]:
    return sources("recovery", skip={"recovery/migrations"})


@pytest.fixture(scope="session")
def recovery_imports(recovery_modules: dict[str, Source]) -> list[Import]:
    return all_imports(recovery_modules, extra_modules=MOVED)
