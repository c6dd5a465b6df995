"""Workers that die, messages that cannot run, a database that goes away."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from celery import chain, states
from django_celery_results.models import TaskResult
from kombu import Connection, Producer

from config.celery import app
from recovery.models import DeadLetter, DueRetry
from recovery.replay import replay

from . import worker_tasks as t
from .harness import wait_for
from .test_retry_and_park import result_state, runs

pytestmark = pytest.mark.integration


def test_killed_worker_child_task_is_redelivered_and_completes(start_worker, store, key):
    # Given a task that sleeps on its first run
    worker = start_worker()
    result = t.sleepy_first_time.delay(key, 60)
    wait_for(lambda: store.lrange(f"t:pids:{key}", 0, -1), 20, message="first run")
    pid = int(store.lrange(f"t:pids:{key}", 0, -1)[0])
    assert pid in worker.child_pids()
    # When its pool child is SIGKILLed
    os.kill(pid, signal.SIGKILL)
    # Then the message is redelivered and the task completes on another child
    assert result.get(timeout=60) == 2
    assert not DeadLetter.objects.filter(task_id=result.id).exists()


def test_task_that_kills_its_worker_every_time_is_parked_after_the_delivery_cap(start_worker, store, key):
    start_worker()
    result = t.kills_its_worker.delay(key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 90,
                      message="poison letter")
    # MAX_DELIVERIES is 3 in the test settings: three deliveries ran, the fourth was parked.
    assert runs(store, key) == 3
    assert letter.kind == "poison"
    assert "delivered 4 times" in letter.reason
    assert "worker lost" in letter.reason
    assert letter.args == [key]
    time.sleep(3)
    assert runs(store, key) == 3
    wait_for(lambda: result_state(result.id) == states.FAILURE, 10, message="FAILURE result")


def test_whole_worker_killed_with_reserved_tasks_resumes_on_another_worker(start_worker, store, key):
    # Given a worker holding several tasks (one running, the rest reserved)
    doomed = start_worker("doomed", concurrency=1)
    keys = [f"{key}-{i}" for i in range(6)]
    results = [t.long_running.delay(k, 2) for k in keys]
    wait_for(lambda: any(runs(store, k) for k in keys), 20, message="a task to start")
    # When the whole worker is SIGKILLed at once and another worker is running
    doomed.kill_everything()
    killed_at = time.monotonic()
    start_worker("survivor", concurrency=2)
    # Then every task finishes on the survivor within two minutes
    for result in results:
        result.get(timeout=max(1, 120 - (time.monotonic() - killed_at)))
    assert time.monotonic() - killed_at < 120
    assert all(store.llen(f"t:done:{k}") >= 1 for k in keys)


def test_live_workers_long_task_past_the_visibility_timeout_runs_once(start_worker, store, key):
    # Visibility timeout is 12 s in the test settings; two workers compete for messages.
    start_worker("a")
    start_worker("b")
    result = t.long_running.delay(key, 30)
    assert result.get(timeout=90) == 1
    time.sleep(3)
    assert runs(store, key) == 1


def test_retry_delayed_past_the_visibility_timeout_runs_exactly_once(start_worker, store, key):
    start_worker("a")
    start_worker("b")
    result = t.retry_in_twenty_seconds.delay(key)
    wait_for(lambda: runs(store, key) == 1, 20, message="first run")
    # The 20 s retry waits in the due-table, not as a broker ETA message.
    wait_for(lambda: DueRetry.objects.filter(task_id=result.id).exists(), 10, message="due row")
    assert result.get(timeout=60) == 2
    time.sleep(15)
    assert runs(store, key) == 2
    assert not DueRetry.objects.exists()


def test_unknown_task_name_becomes_a_poison_dead_letter(start_worker, store, key):
    worker = start_worker()
    sent = app.send_task("billing.tasks.removed_last_release", args=[7], kwargs={"force": True})
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=sent.id).first(), 30,
                      message="poison letter")
    assert letter.kind == "poison"
    assert letter.task_name == "billing.tasks.removed_last_release"
    assert letter.args == [7] and letter.kwargs == {"force": True}
    assert json.loads(letter.raw_body)[0] == [7]
    # The worker keeps running.
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None


def test_undecodable_body_becomes_a_poison_dead_letter(start_worker, store, key):
    worker = start_worker()
    task_id = str(uuid.uuid4())
    with Connection(app.conf.broker_url) as conn:
        Producer(conn).publish(
            b'{"this is": not json',
            routing_key="celery", exchange="",
            headers={"task": t.flaky_twice.name, "id": task_id, "lang": "py", "retries": 0,
                     "root_id": task_id, "parent_id": None, "group": None, "eta": None,
                     "expires": None, "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "",
                     "origin": "test"},
            content_type="application/json", content_encoding="utf-8",
        )
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 30,
                      message="poison letter")
    assert letter.kind == "poison"
    assert letter.raw_body == '{"this is": not json'
    assert letter.task_name == t.flaky_twice.name
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None


def test_database_cut_while_parking_loses_nothing(start_worker, store, key, db_proxy, worker_env,
                                                  settings):
    # Given a worker that reaches PostgreSQL through a proxy we can cut
    db = worker_env["TEST_DATABASE_URL"].rsplit("@", 1)
    via_proxy = f"{db[0]}@127.0.0.1:{db_proxy.port}/{db[1].split('/', 1)[1]}"
    start_worker(env={"TEST_DATABASE_URL": via_proxy})
    assert t.flaky_twice.delay(key + "-warm").get(timeout=30) == 3
    # When the database drops off the network just before a task is parked
    db_proxy.cut()
    result = t.declined.delay(key, 99)
    spool = settings.RECOVERY["SPOOL_DIR"]
    wait_for(lambda: os.path.isdir(spool) and any(f.endswith(".json") for f in os.listdir(spool)),
             30, message="spooled letter")
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    # The message was acknowledged: the letter is durable in the spool.
    wait_for(lambda: store.hlen("unacked") == 0, 10, message="message acknowledged")
    # Then once the database is back the workers drain the spool into the table
    db_proxy.restore()
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="drained letter")
    assert letter.exception_type == "recovery.errors.DependencyError"
    assert letter.attempts == 1
    wait_for(lambda: result_state(result.id) == states.FAILURE, 10, message="FAILURE result")
    wait_for(lambda: not any(f.endswith(".json") for f in os.listdir(spool)), 10,
             message="empty spool")


def test_parked_chain_step_continues_the_chain_when_replayed(start_worker, store, key):
    start_worker()
    workflow = chain(t.add_one.s(1), t.times_ten_unless_broken.s(key), t.remember.s(key))
    workflow.apply_async()
    letter = wait_for(lambda: DeadLetter.objects.filter(task_name=t.times_ten_unless_broken.name).first(),
                      30, message="parked chain step")
    assert letter.args == [2, key]
    assert letter.headers["chain"], "the rest of the chain is kept on the letter"
    assert store.get(f"t:result:{key}") is None
    # When the cause is fixed and the letter replayed
    store.set(f"t:fixed:{key}", 1)
    replay(letter)
    # Then the chain continues to its last step and the letter is resolved
    wait_for(lambda: store.get(f"t:result:{key}") == b"20", 30, message="chain to finish")
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.RESOLVED, 10,
             message="letter resolved")
    letter.refresh_from_db()
    assert letter.replay_count == 1
    assert DeadLetter.objects.count() == 1


def test_project_wide_task_cls_makes_plain_tasks_recovery_tasks(start_worker, store, key):
    start_worker(app="tests.integration.task_cls_app:app")
    sent = app.send_task("task_cls_app.import_invoice", args=[key], queue="celery")
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=sent.id).first(), 30,
                      message="letter from a plain @app.task")
    assert letter.kind == "data_integrity"
    assert letter.attempts == 1


def test_message_without_task_or_id_is_parked_under_its_body_hash(start_worker, store, key):
    import hashlib

    worker = start_worker()
    body = b'{"event": "order.created", "order": 17}'
    with Connection(app.conf.broker_url) as conn:
        Producer(conn).publish(body, routing_key="celery", exchange="",
                               content_type="application/json", content_encoding="utf-8")
    expected_id = "poison-" + hashlib.sha256(body).hexdigest()
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=expected_id).first(), 30,
                      message="poison letter keyed by body hash")
    assert letter.kind == "poison"
    assert letter.raw_body == body.decode()
    assert "not a Celery task message" in letter.reason
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None


def test_replay_that_fails_again_is_parked_again_on_the_same_row(start_worker, store, key):
    start_worker()
    result = t.declined.delay(key, 7)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="first park")
    replay(letter, actor="alice")
    wait_for(lambda: runs(store, key) == 2, 30, message="replayed run")
    letter = wait_for(lambda: DeadLetter.objects.filter(
        task_id=result.id, status=DeadLetter.Status.PARKED, replay_count=1).first(), 30,
        message="parked again")
    assert DeadLetter.objects.count() == 1
    assert letter.attempts == 2
    assert [entry["replay"] for entry in letter.history] == [0, 1]
    assert list(letter.events.values_list("action", flat=True)) == ["replayed"]


def test_body_of_the_wrong_shape_is_parked_and_the_worker_keeps_running(start_worker, store, key):
    # Given a running worker
    worker = start_worker()
    task_id = str(uuid.uuid4())
    # When a message for a known task arrives whose JSON body is not [args, kwargs, embed]
    with Connection(app.conf.broker_url) as conn:
        Producer(conn).publish(
            b'"just a string"', routing_key="celery", exchange="",
            headers={"task": t.flaky_twice.name, "id": task_id, "lang": "py", "retries": 0,
                     "root_id": task_id, "parent_id": None, "group": None, "eta": None,
                     "expires": None, "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "",
                     "origin": "test"},
            content_type="application/json", content_encoding="utf-8",
        )
    # Then it is parked as poison with its raw body, and the worker goes on running tasks
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 30,
                      message="poison letter")
    assert letter.kind == "poison"
    assert letter.raw_body == '"just a string"'
    assert "invalid task message" in letter.reason
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None
