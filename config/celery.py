"""The project's Celery app: ``celery -A config.celery:app worker``."""

import os

from celery import Celery

import recovery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
recovery.setup(app)
