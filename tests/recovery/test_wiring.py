"""recovery.setup(app) acts for the apps it was given only: Celery's worker and task signals
are process-wide, and a second, plain app in the same process (a project's other app, the
stock-Celery baseline of bench/) must keep stock Celery's behaviour."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import Celery, signals

from recovery import wiring
from recovery.delivery import redis_fetch
from recovery.observe import metrics


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(wiring, "close_old_connections", lambda: seen.append("reuse"))
    monkeypatch.setattr(redis_fetch, "install", lambda: seen.append("redis fetch"))
    monkeypatch.setattr(metrics, "ensure_multiprocess_dir", lambda: seen.append("metrics dir"))
    monkeypatch.setattr(wiring, "unbound_thread_connection", lambda: seen.append("unbound"))
    return seen


def _apps():
    plain = Celery("plain", broker="redis://127.0.0.1:6379/9", set_as_current=False)
    ours = wiring.setup(Celery("ours", broker="redis://127.0.0.1:6379/9", set_as_current=False))
    return plain, ours


def test_the_worker_and_task_receivers_are_connected_scoped():
    _apps()
    for signal, receiver, uid in wiring._WORKER_RECEIVERS:
        connected = [r for _key, r in signal.receivers]
        assert any(r is wiring._SCOPED[uid] for r in connected), uid
        assert not any(r is receiver for r in connected), uid


def test_a_plain_apps_worker_and_tasks_keep_stock_celery(calls):
    plain, ours = _apps()
    worker = SimpleNamespace(app=plain)
    task = SimpleNamespace(app=plain, request=SimpleNamespace(is_eager=False))

    wiring._SCOPED["recovery-redis-fetch"](sender=worker)
    wiring._SCOPED["recovery-metrics-init"](sender=worker)
    wiring._SCOPED["recovery-db-reuse"](sender=task, task_id="t1", task=task)
    assert calls == []


def test_an_installed_apps_worker_and_tasks_get_recovery(calls):
    plain, ours = _apps()
    worker = SimpleNamespace(app=ours)
    task = SimpleNamespace(app=ours, request=SimpleNamespace(is_eager=False))

    wiring._SCOPED["recovery-redis-fetch"](sender=worker)
    wiring._SCOPED["recovery-metrics-init"](sender=worker)
    wiring._SCOPED["recovery-db-reuse"](sender=task, task_id="t1", task=task)
    assert calls == ["redis fetch", "metrics dir", "reuse"]


def test_a_pool_child_is_judged_by_its_workers_app(calls):
    from celery import current_app

    plain, ours = _apps()
    before = current_app._get_current_object()
    try:
        # A pool child's signals come without a sender; Celery made the worker's app current.
        plain.set_current()
        wiring._SCOPED["recovery-db-unbound-child"](sender=None)
        assert calls == []
        ours.set_current()
        wiring._SCOPED["recovery-db-unbound-child"](sender=None)
        assert calls == ["unbound"]
    finally:
        before.set_current()


def test_a_pool_child_started_with_spawn_has_a_copy_of_the_app_and_is_judged_installed(calls):
    import pickle

    from celery import current_app

    plain, ours = _apps()
    # `spawn` hands the child a pickled app: a new object, with the configuration.
    copy, plain_copy = pickle.loads(pickle.dumps(ours)), pickle.loads(pickle.dumps(plain))
    assert copy is not ours
    before = current_app._get_current_object()
    try:
        plain_copy.set_current()
        wiring._SCOPED["recovery-db-unbound-child"](sender="celery@host")
        assert calls == []
        copy.set_current()
        wiring._SCOPED["recovery-db-unbound-child"](sender="celery@host")
        assert calls == ["unbound"]
    finally:
        before.set_current()
