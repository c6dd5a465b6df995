"""The example project on a kombu or django-celery-results whose private internals moved:
``RECOVERY_TEST_REMOVE`` names the class attribute to delete before the worker starts
(tests/integration/test_housekeeping.py)."""

import os

from django.utils.module_loading import import_string

import django

from config.celery import app  # noqa: F401 - the worker's app

django.setup()

_owner, _, _attribute = os.environ["RECOVERY_TEST_REMOVE"].rpartition(".")
delattr(import_string(_owner), _attribute)
