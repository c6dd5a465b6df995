"""recovery.delivery.housekeeping: a blocked job delays only its own thread, a failing one
never ends it, stopping never waits forever, and which consumer may get a statement timeout
(pure logic, no database)."""

from __future__ import annotations

import threading
import time

from recovery.delivery.housekeeping import Ticker


def test_a_job_blocked_on_the_database_does_not_stop_the_visibility_ticks():
    blocked, release = threading.Event(), threading.Event()
    ticks = []

    def hung_database_call():
        blocked.set()
        release.wait(10)

    database = Ticker("test-housekeeping", [(0.05, hung_database_call)]).start()
    visibility = Ticker("test-visibility", [(0.05, lambda: ticks.append(time.monotonic()))]).start()
    try:
        assert blocked.wait(5)
        counted = len(ticks)
        time.sleep(0.5)
        assert len(ticks) >= counted + 5
    finally:
        release.set()
        assert database.stop(5) and visibility.stop(5)


def test_stopping_waits_a_bounded_time_for_a_hung_job_and_says_so(caplog):
    started, release = threading.Event(), threading.Event()
    ticker = Ticker("test-hung", [(0.05, lambda: (started.set(), release.wait(30)))]).start()
    assert started.wait(5)
    began = time.monotonic()
    assert ticker.stop(timeout=0.3) is False
    assert time.monotonic() - began < 2
    assert "test-hung thread still busy" in caplog.text
    release.set()


def test_a_failing_job_is_run_again_and_the_exit_hook_runs_once_stopped():
    calls, exited = [], threading.Event()

    def failing():
        calls.append(1)
        raise RuntimeError("database said no")

    ticker = Ticker("test-failing", [(0.02, failing)], on_exit=exited.set).start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ticker.stop(5)
    assert len(calls) >= 3 and exited.is_set()


def test_the_consumers_connection_gets_a_statement_timeout_only_when_tasks_run_elsewhere():
    from types import SimpleNamespace

    from celery.concurrency import prefork, solo, thread

    from recovery.delivery.housekeeping import Housekeeping

    def consumer(pool_class):
        return SimpleNamespace(pool=object.__new__(pool_class))

    assert Housekeeping.tasks_run_elsewhere(consumer(prefork.TaskPool))
    assert Housekeeping.tasks_run_elsewhere(consumer(thread.TaskPool))
    assert not Housekeeping.tasks_run_elsewhere(consumer(solo.TaskPool))
    assert not Housekeeping.tasks_run_elsewhere(SimpleNamespace())
