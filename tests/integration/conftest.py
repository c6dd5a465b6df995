from __future__ import annotations

import os
import uuid

import pytest
from django.conf import settings
from django.db import connection

from .harness import Beat, TcpProxy, Worker


@pytest.fixture
def store(broker):
    """Where worker tasks record their runs (the test Redis)."""
    return broker


@pytest.fixture
def key():
    return uuid.uuid4().hex[:12]


@pytest.fixture
def worker_env(transactional_db, tmp_path, settings):
    """Environment for worker subprocesses: the test database, the test broker,
    and the same spool directory the test process sees."""
    db = connection.settings_dict
    url = f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TEST_DATABASE_URL": url,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "RECOVERY_SPOOL_DIR": settings.RECOVERY["SPOOL_DIR"],
        "RECOVERY_VAR_DIR": str(tmp_path / "var"),
        "PYTHONUNBUFFERED": "1",
    }
    return env


@pytest.fixture
def start_worker(worker_env, tmp_path, store):
    started: list[Worker] = []

    def start(name: str = "w1", env: dict | None = None, **kwargs) -> Worker:
        worker = Worker(name, tmp_path, {**worker_env, **(env or {})}, **kwargs)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def db_proxy():
    db = connection.settings_dict
    proxy = TcpProxy(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    yield proxy
    proxy.close()


@pytest.fixture
def start_beat(worker_env, tmp_path):
    """``celery beat`` with the worker environment (plus ``env``), stopped after the test."""
    started: list[Beat] = []

    def start(env: dict | None = None) -> Beat:
        beat = Beat(tmp_path, {**worker_env, **(env or {})})
        started.append(beat)
        return beat.wait_ready()

    yield start
    for beat in started:
        beat.stop()
