"""A project that makes RecoveryTask the default for every task (``task_cls``)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402
from celery import Celery  # noqa: E402

import recovery  # noqa: E402
from recovery.core.errors import DataIntegrityError  # noqa: E402

django.setup()

app = Celery("task_cls_app", task_cls="recovery.task:RecoveryTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
recovery.setup(app)


@app.task(name="task_cls_app.import_invoice", bind=True)
def import_invoice(self, key: str) -> None:
    raise DataIntegrityError(f"invoice {key} has a negative total")
