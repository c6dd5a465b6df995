"""The models and their migrations agree: nothing is left for makemigrations to write."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_the_models_need_no_new_migration():
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exited:  # --check exits non-zero when a migration is missing
        pytest.fail(f"makemigrations --check found model changes without a migration "
                    f"(exit {exited.code}):\n{out.getvalue()}")
    assert "No changes detected" in out.getvalue()
