"""Run a snippet in a new Python interpreter, for what this pytest process cannot show.

By the time a test runs, pytest-django has set Django up and earlier tests have imported
most of recovery: a module imported once does not warn twice, and ``import recovery``
cannot prove it loads no models once the models are loaded. A fresh interpreter at the
repository's root starts clean; the snippet reports by printing one JSON value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from .imports import REPO

TEST_SETTINGS = "tests.settings"


def run_python(code: str, *, django: bool) -> Any:
    """Run ``code`` and return the JSON value it printed last.

    With ``django`` the interpreter gets the test settings and calls ``django.setup()``
    first; without, ``DJANGO_SETTINGS_MODULE`` is not even set.
    """
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    if django:
        env["DJANGO_SETTINGS_MODULE"] = TEST_SETTINGS
        code = f"import django\ndjango.setup()\n{code}"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"the snippet failed (exit {done.returncode}):\n{code}\n{done.stderr}",
                    pytrace=False)
    return json.loads(done.stdout.strip().splitlines()[-1])
