"""``import recovery`` works before Django is set up, and so does ``recovery.setup(app)``.

A project's ``celery.py`` imports recovery and calls ``setup`` while Django may not be
configured yet (and Django imports the package itself from INSTALLED_APPS before it
loads any models). Both run in a fresh interpreter with no DJANGO_SETTINGS_MODULE.
"""

from __future__ import annotations

from .interpreter import run_python

MODELS = ("recovery.store.models", "recovery.models")

LOADED = "sorted(name for name in sys.modules if name.split('.')[0] == 'recovery')"


def test_importing_recovery_loads_no_models_and_needs_no_django_settings():
    loaded = run_python(f"import json, sys\nimport recovery\nprint(json.dumps({LOADED}))",
                        django=False)

    assert not set(MODELS) & set(loaded), f"import recovery loaded the models: {loaded}"


def test_setup_installs_the_runtime_into_a_bare_celery_app_without_django():
    found = run_python(f"""
import json, sys
from celery import Celery
import recovery

app = Celery()
print(json.dumps({{
    "returned_the_app": recovery.setup(app) is app,
    "consumer": app.conf.worker_consumer,
    "loaded": {LOADED},
}}))
""", django=False)

    assert found["returned_the_app"]
    assert found["consumer"] == "recovery.delivery.worker:RecoveryConsumer"
    assert not set(MODELS) & set(found["loaded"]), f"setup loaded the models: {found['loaded']}"
