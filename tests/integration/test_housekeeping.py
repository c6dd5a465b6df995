"""A worker's housekeeping (recovery.delivery.housekeeping) under a database that hangs: what the
worker holds stays its own, and the database work picks up again when the database answers."""

from __future__ import annotations

import time
from importlib.metadata import version

import pytest
from django.utils import timezone

from recovery.store.due import hold
from recovery.models import DueRetry

from ..brokers import BROKER
from . import db_settings_tasks
from . import worker_tasks as t
from .harness import Worker, wait_for
from .test_retry_and_park import runs

pytestmark = pytest.mark.integration


def _via(proxy, worker_env) -> str:
    user, rest = worker_env["TEST_DATABASE_URL"].rsplit("@", 1)
    return f"{user}@127.0.0.1:{proxy.port}/{rest.split('/', 1)[1]}"


def test_a_hung_database_never_lets_a_held_task_run_twice(start_worker, store, key, db_proxy,
                                                          worker_env, settings):
    visibility = float(settings.RECOVERY["VISIBILITY_TIMEOUT_SECONDS"])
    # The outage outlasts the visibility timeout and the next scan for stranded messages
    # (every 10 s, recovery.wiring), so a message left unrefreshed would be given to b.
    outage = visibility + 14
    # Given worker "a", which reaches PostgreSQL through a proxy, running a task that lasts
    # longer than the outage
    holder = start_worker("a", env={"TEST_DATABASE_URL": _via(db_proxy, worker_env)})
    result = t.long_running.delay(key, outage + 15)
    wait_for(lambda: runs(store, key) == 1, 30, message="the task to start on a")
    # (Redis: the message's visibility, kombu's delivery time, which a must keep refreshing
    # and the test can watch; SQS: a lease a must keep extending too, but the broker's own,
    # so only its outcome (one run) shows; RabbitMQ keeps a held message from other workers
    # for as long as a's connection lives: nothing to refresh.)
    watch_lease = BROKER == "redis"
    if watch_lease:
        (tag, _), = wait_for(lambda: store.zrange("unacked_index", 0, -1, withscores=True),
                             10, message="the held message")
    # and worker "b" competing for messages, straight to the database
    rival = start_worker("b")
    # When the database hangs (accepts, reads, never answers)
    db_proxy.hang()
    hung_at = time.time()
    refreshed = []
    while time.time() - hung_at < outage:
        refreshed.append((store.zscore("unacked_index", tag) or 0.0) if watch_lease else 0.0)
        time.sleep(1)
    db_proxy.restore()
    # Then the task runs exactly once: a kept its message from b the whole time
    assert result.get(timeout=90) == 1
    time.sleep(3)
    assert runs(store, key) == 1
    if watch_lease:
        assert max(refreshed) > hung_at + visibility / 2, \
            f"visibility not refreshed during the hang: {refreshed} (hang at {hung_at})"
    # And once the database answers again, a's housekeeping works again: with b gone, a
    # publishes a retry that fell due
    rival.stop()
    due = hold(t.add_one.s(41).set(task_id=f"due-{key}"), timezone.now())
    wait_for(lambda: not DueRetry.objects.filter(pk=due.pk).exists(), 30,
             message="a to publish the due retry")
    assert "due-" + key in wait_for(lambda: holder.log().count(f"due-{key}") and holder.log(),
                                    30, message="a to run the due retry")


def test_tasks_run_on_the_projects_database_settings_not_on_recoverys_bounds(start_worker):
    # Given a worker whose consumer bounded its own connection, and whose pool children
    # are forked again after every task (so the second child is forked after the bounds)
    start_worker("a", concurrency=1, extra=(
        "-I", "tests.integration.worker_tasks,tests.integration.db_settings_tasks",
        "--max-tasks-per-child", "1"))
    # When two tasks report their connection's settings
    first = db_settings_tasks.connection_settings.delay().get(timeout=30)
    second = db_settings_tasks.connection_settings.delay().get(timeout=30)
    # Then both ran on the project's DATABASES as written: no statement timeout, no
    # network options recovery gives only its own connections
    assert first["pid"] != second["pid"]
    for seen in (first, second):
        assert seen["statement_timeout"] == "0"
        assert seen["options"] == ["connect_timeout"]


def test_stopping_a_worker_while_the_database_hangs_takes_seconds(start_worker, db_proxy,
                                                                  worker_env):
    # Given a worker whose database connections go through a proxy, warmed up
    worker = start_worker("a", env={"TEST_DATABASE_URL": _via(db_proxy, worker_env)})
    assert t.add_one.delay(1).get(timeout=30) == 2
    # and the database hangs, so its housekeeping is stuck in a query
    db_proxy.hang()
    time.sleep(3)
    # When the worker is asked to stop (warm shutdown)
    stopping = time.monotonic()
    worker.process.terminate()
    # Then it exits within seconds instead of waiting for the database (its threads
    # share one 5 s wait; before, the consumer itself hung in the query and never exited)
    worker.process.wait(timeout=60)
    took = time.monotonic() - stopping
    assert took < 15, f"stopping took {took:.1f}s"
    assert "thread still busy" in worker.log()


# kombu's own Redis transport uses the attributes recovery.delivery.visibility needs, so deleting
# one breaks kombu before recovery looks (tests/recovery/test_visibility.py checks that
# side on a real channel); django-celery-results' private methods are only ours to miss.
@pytest.mark.parametrize("removed, named", [
    ("django_celery_results.backends.database.DatabaseBackend._get_meta_from_request",
     f"django-celery-results {version('django-celery-results')} has no "
     "DatabaseBackend._get_meta_from_request"),
], ids=["django-celery-results"])
def test_a_worker_refuses_to_start_when_private_internals_moved(worker_env, tmp_path, removed,
                                                                named):
    # Given a kombu or django-celery-results release without an internal recovery uses
    env = {**worker_env, "RECOVERY_TEST_REMOVE": removed}
    # When a worker starts
    worker = Worker("moved", tmp_path, env, app="tests.integration.moved_internals_app:app")
    try:
        # Then it exits before taking work, naming the package and its version
        worker.process.wait(timeout=60)
        log = worker.log()
        assert worker.process.returncode != 0, log[-3000:]
        assert named in log and "celery-recovery cannot run on this worker" in log
        assert " ready." not in log
    finally:
        worker.stop()
