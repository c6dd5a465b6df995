"""Workers that die, messages that cannot run, a database that goes away."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid

import pytest
from celery import chain, states
from django_celery_results.models import TaskResult
from django.db import connection
from kombu import Connection, Producer

from config.celery import app
from recovery.models import DeadLetter, DueRetry
from recovery.operations.replay import replay

from ..brokers import BROKER, only_on, unacknowledged
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
    publish_raw(b'{"this is": not json', t.flaky_twice.name, task_id)
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
    wait_for(lambda: unacknowledged(store) == 0, 10, message="message acknowledged")
    # Then once the database is back the workers drain the spool into the table
    db_proxy.restore()
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="drained letter")
    assert letter.exception_type == "recovery.errors.DependencyError"
    assert letter.attempts == 1
    wait_for(lambda: result_state(result.id) == states.FAILURE, 10, message="FAILURE result")
    wait_for(lambda: not any(f.endswith(".json") for f in os.listdir(spool)), 10,
             message="empty spool")


def hashed(task_id: str) -> str:
    import hashlib

    return "task-id-sha256-" + hashlib.sha256(task_id.encode("utf-8")).hexdigest()


def spool_files(spool: str, suffix: str) -> list[str]:
    return sorted(f for f in os.listdir(spool) if f.endswith(suffix)) if os.path.isdir(spool) else []


def publish_raw(body: bytes, task: str, task_id, **headers) -> None:
    """Publish a task message as a client other than Celery might, headers and all."""
    with Connection(app.conf.broker_url) as conn:
        Producer(conn).publish(
            body, routing_key="celery", exchange="",
            headers={"task": task, "id": task_id, "lang": "py", "retries": 0,
                     "root_id": task_id, "parent_id": None, "group": None, "eta": None,
                     "expires": None, "timelimit": [None, None], "argsrepr": "",
                     "kwargsrepr": "", "origin": "test", **headers},
            content_type="application/json", content_encoding="utf-8",
        )


def task_body(*args) -> bytes:
    return json.dumps([list(args), {}, {"callbacks": None, "errbacks": None, "chain": None,
                                        "chord": None}]).encode()


def test_tasks_whose_ids_no_column_can_hold_are_parked_as_poison_under_their_hash_unrun(
        start_worker, store, key, settings):
    # Given a worker, and clients that sent a 300-character task id and one with a NUL in it
    worker = start_worker()
    long_id = f"import-{key}-" + "r" * (300 - len(f"import-{key}-"))
    nul_id = f"{key}\x00charge"
    # When both messages arrive (for a task that would succeed)
    if BROKER == "amqp":
        # AMQP carries a task id in the correlation_id property too, a short string of at
        # most 255 bytes: Celery cannot even send the long one. A client that sends the id
        # in the headers alone can.
        publish_raw(task_body(key + "-long"), t.flaky_twice.name, long_id)
    else:
        t.flaky_twice.apply_async((key + "-long",), task_id=long_id)
    t.flaky_twice.apply_async((key + "-nul",), task_id=nul_id)
    # Then neither runs (its result could never be stored, so it would run again and again):
    # each is one poison letter under its id's hash, the reason naming the id, the id as
    # sent kept, straight in the table
    parked = DeadLetter.objects.filter(task_id__in=[hashed(long_id), hashed(nul_id)])
    wait_for(lambda: parked.count() == 2, 30, message="two letters under hashed ids")
    letters = [parked.get(task_id=hashed(long_id)), parked.get(task_id=hashed(nul_id))]
    assert [letter.kind for letter in letters] == ["poison", "poison"]
    assert "task id is 300 characters long" in letters[0].reason
    assert "task id contains a NUL character" in letters[1].reason
    assert [letter.headers["recovery_original_task_id"] for letter in letters] == \
        [long_id, nul_id.replace("\x00", "\\x00")]
    assert [letter.args for letter in letters] == [[key + "-long"], [key + "-nul"]]
    assert spool_files(settings.RECOVERY["SPOOL_DIR"], ".json") == []
    assert runs(store, key + "-long") == 0 and runs(store, key + "-nul") == 0
    # ... their messages are gone from the broker, and the worker keeps working
    wait_for(lambda: unacknowledged(store) == 0, 10, message="messages acknowledged")
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None


@only_on("redis", "amqp", reason="publishes a 5 MiB body, which SQS refuses at SendMessage "
                                  "(a queue takes at most 1 MiB), so no worker ever receives it")
def test_forged_history_and_oversized_bodies_are_parked_as_poison_before_they_run(
        start_worker, store, key):
    # Given a worker
    worker = start_worker()
    forged, nested, huge = (str(uuid.uuid4()) for _ in range(3))
    # When messages arrive with a recovery_history header that is not a list of attempts
    # (a string; a list of non-objects) and with a body over MAX_MESSAGE_BYTES (4 MiB)
    publish_raw(task_body(key + "-forged"), t.flaky_twice.name, forged,
                recovery_history="'; DROP TABLE recovery_deadletter; --")
    publish_raw(task_body(key + "-nested"), t.flaky_twice.name, nested,
                recovery_history=[1, "two", None])
    publish_raw(task_body(key + "-huge" + "x" * (5 * 1024 * 1024)), t.flaky_twice.name, huge)
    # Then each is a poison letter whose reason names what is wrong, and none ran
    letters = DeadLetter.objects.filter(task_id__in=[forged, nested, huge])
    wait_for(lambda: letters.count() == 3, 60, message="three poison letters")
    reasons = {letter.task_id: letter.reason for letter in letters}
    assert {letter.kind for letter in letters} == {"poison"}
    assert "forged or corrupt recovery_history header" in reasons[forged]
    assert "forged or corrupt recovery_history header" in reasons[nested]
    assert "message body is too large: 5.0 MiB, over the limit of 4.0 MiB" in reasons[huge]
    # Over the limit the body, the only copy of the message, is kept whole (recovery.core.bounds)
    # and its decoded 5 MiB arguments are not stored a second time
    oversized = letters.get(task_id=huge)
    assert oversized.args == [] and key + "-huge" in oversized.raw_body
    assert len(oversized.raw_body) > 5 * 1024 * 1024
    assert [runs(store, key + s) for s in ("-forged", "-nested", "-huge")] == [0, 0, 0]
    # ... and the worker keeps working
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None


def test_letters_spooled_behind_a_record_the_database_refuses_drain_once_it_is_back(
        start_worker, store, key, db_proxy, worker_env, settings):
    import requests

    from .test_metrics import free_port

    # Given a worker that reaches PostgreSQL through a proxy we can cut, serving its metrics,
    # and a dead-letter table that refuses one task id (a constraint added by mistake)
    db = worker_env["TEST_DATABASE_URL"].rsplit("@", 1)
    via_proxy = f"{db[0]}@127.0.0.1:{db_proxy.port}/{db[1].split('/', 1)[1]}"
    port = free_port()
    start_worker(env={"TEST_DATABASE_URL": via_proxy, "RECOVERY_METRICS_PORT": str(port)})
    assert t.flaky_twice.delay(key + "-warm").get(timeout=30) == 3
    refused_id = f"refused-{key}"
    table = DeadLetter._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT test_refused '
                       f"CHECK (task_id <> %s) NOT VALID", [refused_id])
    try:
        spool = settings.RECOVERY["SPOOL_DIR"]
        # When the database drops off the network and four tasks are parked, the refused
        # one first, then a 300-character id, a NUL in an id, and an ordinary one
        db_proxy.cut()
        long_id = "x" * 300
        nul_id = f"{key}\x00nul"
        sent = []
        for n, task_id in enumerate([refused_id, long_id, nul_id, None]):
            if BROKER == "amqp" and task_id == long_id:
                # AMQP's correlation_id holds 255 bytes: only the headers carry this id.
                publish_raw(task_body(f"{key}-{n}", n), t.declined.name, long_id)
                sent.append(None)
            else:
                sent.append(t.declined.apply_async((f"{key}-{n}", n), task_id=task_id))
            wait_for(lambda: len(spool_files(spool, ".json")) == n + 1, 30,
                     message=f"spooled letter {n + 1}")
        wait_for(lambda: unacknowledged(store) == 0, 10, message="messages acknowledged")
        assert not DeadLetter.objects.exists()

        # ... and the database comes back
        db_proxy.restore()

        # Then the letters behind the refused record are drained into the table
        ordinary = sent[3].id
        expected = {hashed(long_id), hashed(nul_id), ordinary}
        wait_for(lambda: set(DeadLetter.objects.values_list("task_id", flat=True)) == expected,
                 30, message="the three letters behind the refused one")
        wait_for(lambda: result_state(ordinary) == states.FAILURE, 10, message="FAILURE result")
        # ... and the refused one is quarantined with its reason, counted on the metric (a
        # drain deletes each spooled file just after its row commits: wait for the last)
        wait_for(lambda: spool_files(spool, ".json") == [], 10, message="the spool drained")
        [bad] = spool_files(spool, ".bad")
        assert json.loads(open(os.path.join(spool, bad)).read())["task_id"] == refused_id
        reason = open(os.path.join(spool, bad[:-len(".bad")] + ".error")).read()
        assert "test_refused" in reason
        scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "recovery_spool_quarantined 1.0" in scraped
        assert "recovery_spool_backlog 0.0" in scraped
    finally:
        if db_proxy._listener is None:
            db_proxy.restore()
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT IF EXISTS test_refused')


def test_parked_chain_step_is_replayed_alone_never_with_its_stored_chain(start_worker, store, key):
    start_worker()
    workflow = chain(t.add_one.s(1), t.times_ten_unless_broken.s(key), t.remember.s(key))
    workflow.apply_async()
    letter = wait_for(lambda: DeadLetter.objects.filter(task_name=t.times_ten_unless_broken.name).first(),
                      30, message="parked chain step")
    assert letter.args == [2, key]
    assert letter.headers["chain"], "the rest of the chain is kept on the letter, for the record"
    assert store.get(f"t:result:{key}") is None
    # When the cause is fixed and the letter replayed
    store.set(f"t:fixed:{key}", 1)
    replay(letter)
    # Then the step runs and the letter is resolved, but the stored chain does not go on: a
    # stored message is input, and a replay takes no workflow options from it
    # (tests/security/test_replay_options.py)
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.RESOLVED, 30,
             message="letter resolved")
    time.sleep(2)
    assert store.get(f"t:result:{key}") is None
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


# -- our bookkeeping after a body that returned is never the task's failure -----------------


def via_proxy(worker_env, db_proxy) -> str:
    db = worker_env["TEST_DATABASE_URL"].rsplit("@", 1)
    return f"{db[0]}@127.0.0.1:{db_proxy.port}/{db[1].split('/', 1)[1]}"


def spooled(spool) -> list[str]:
    return [f for f in os.listdir(spool) if f.endswith(".json")] if os.path.isdir(spool) else []


def test_result_store_cut_after_the_body_returned_is_spooled_never_parked(
        start_worker, store, key, db_proxy, worker_env, settings):
    # Given a worker that reaches PostgreSQL through a proxy, running a payment
    start_worker(env={"TEST_DATABASE_URL": via_proxy(worker_env, db_proxy)})
    result = t.charge_when_told.delay(key, 42)
    wait_for(lambda: store.get(f"t:waiting:{key}"), 30, message="the body to run")
    # When the database drops off the network and then the body returns
    db_proxy.cut()
    store.set(f"t:go:{key}", 1)
    # Then the message is acknowledged with the SUCCESS result spooled, nothing parked
    spool = settings.RECOVERY["SPOOL_DIR"]
    wait_for(lambda: spooled(spool), 30, message="spooled result")
    wait_for(lambda: unacknowledged(store) == 0, 20, message="message acknowledged")
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    # And once the database is back the drain stores the result; still no letter
    db_proxy.restore()
    wait_for(lambda: result_state(result.id) == states.SUCCESS, 30, message="SUCCESS result")
    assert TaskResult.objects.get(task_id=result.id).task_name == t.charge_when_told.name
    assert result.get(timeout=5) == {"charged": 42, "runs": 1}
    wait_for(lambda: not spooled(spool), 10, message="empty spool")
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    assert runs(store, key) == 1


def test_result_store_on_a_restarted_connection_is_retried_on_a_fresh_one(
        start_worker, store, key, db_proxy, worker_env, settings):
    # Given a payment whose pool child holds a live database connection
    worker = start_worker(env={"TEST_DATABASE_URL": via_proxy(worker_env, db_proxy)})
    result = t.charge_when_told.delay(key, 7)
    wait_for(lambda: store.get(f"t:waiting:{key}"), 30, message="the body to run")
    # When the database restarts (every connection dropped, new ones accepted at once)
    db_proxy.cut()
    db_proxy.restore()
    store.set(f"t:go:{key}", 1)
    # Then the first write fails on the dead connection and the retry stores SUCCESS
    wait_for(lambda: result_state(result.id) == states.SUCCESS, 30, message="SUCCESS result")
    assert result.get(timeout=5) == {"charged": 7, "runs": 1}
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    assert runs(store, key) == 1
    assert "cannot be decoded" not in worker.log()


class Unanswered:
    """A database host that hangs: it accepts connections on ``port`` and never answers,
    so a client waits for its connect timeout (5 s in config/settings.py)."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._hold, daemon=True).start()

    def _hold(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in self.held:
            sock.close()


def test_result_store_against_a_hanging_database_is_spooled_after_the_connect_timeout(
        start_worker, store, key, db_proxy, worker_env, settings):
    # Given a worker that reaches PostgreSQL through a proxy, running a payment
    start_worker(env={"TEST_DATABASE_URL": via_proxy(worker_env, db_proxy)})
    result = t.charge_when_told.delay(key, 9)
    wait_for(lambda: store.get(f"t:waiting:{key}"), 30, message="the body to run")
    # When the database host stops answering (connections dropped, new ones hang)
    db_proxy.cut()
    hung = Unanswered(db_proxy.port)
    try:
        store.set(f"t:go:{key}", 1)
        # Then the write is spooled once the retry times out, and the message acknowledged
        spool = settings.RECOVERY["SPOOL_DIR"]
        wait_for(lambda: spooled(spool), 40, message="spooled result")
        wait_for(lambda: unacknowledged(store) == 0, 20, message="message acknowledged")
    finally:
        hung.close()
    # And once the database answers again the result is stored; nothing was parked
    db_proxy.restore()
    wait_for(lambda: result_state(result.id) == states.SUCCESS, 40, message="SUCCESS result")
    assert result.get(timeout=5) == {"charged": 9, "runs": 1}
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    assert runs(store, key) == 1


def test_result_the_serializer_cannot_encode_is_not_called_undecodable(start_worker, store, key):
    # Given a task whose return value JSON cannot encode (the body ran)
    worker = start_worker()
    result = t.returns_a_set.delay(key)
    # When it returns
    wait_for(lambda: result_state(result.id) is not None, 30, message="a result")
    # Then Celery records the encoding failure as its result, and nothing is parked: no
    # letter says "cannot be decoded" about a body that decoded and ran
    assert result_state(result.id) == states.FAILURE
    assert "EncodeError" in TaskResult.objects.get(task_id=result.id).result
    time.sleep(1)
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    assert runs(store, key) == 1
    assert "cannot be decoded" not in worker.log()
    assert worker.process.poll() is None


def test_circuit_state_unreachable_after_a_success_keeps_the_success(start_worker, store, key):
    # Given a task counted on a circuit whose shared state (Redis) is down
    worker = start_worker(env={"RECOVERY_SHARED_STATE_URL": "redis://127.0.0.1:9/0"})
    # When it runs and returns
    result = t.counted_on_partner_api.delay(key)
    # Then its result is SUCCESS and no letter exists
    assert result.get(timeout=30) == 1
    assert result_state(result.id) == states.SUCCESS
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    assert "could not record a call" in worker.log()
# -- counting deliveries: once per delivery, only real losses, from zero after a replay ------


def test_task_with_expires_that_kills_its_worker_runs_the_full_delivery_cap(start_worker, store,
                                                                           key):
    # Given a worker, and a task sent with `expires` (as beat entries are) that kills its
    # pool child every time: Celery asks such a request whether it is revoked twice per
    # delivery (on receipt, because it may have expired, and again before it runs)
    start_worker()
    result = t.kills_its_worker.apply_async((key,), expires=600)
    # When the crash loop runs its course
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 90,
                      message="poison letter")
    # Then it is parked only after MAX_DELIVERIES (3) real deliveries ran, not after half
    assert runs(store, key) == 3
    assert letter.kind == "poison"
    assert "delivered 4 times" in letter.reason
    time.sleep(3)
    assert runs(store, key) == 3


#: Why the two tests of what a clean shutdown hands back hold on Redis only.
HANDED_BACK_ON_REDIS_ONLY = (
    "its countdown message waits in the worker's memory, which it hands back on shutdown, "
    "and it asks the worker what it holds over Celery's remote control; on RabbitMQ the "
    "message waits in the broker's delay queues (test_rabbitmq covers what a worker hands "
    "back there), and kombu's SQS transport carries no remote control (test_sqs proves the "
    "hand-back from the worker's log)")


def _held_by(worker_name: str, task_ids: list[str]) -> dict[str, str]:
    """Task id -> state ('reserved', 'scheduled', 'active') of what the worker holds."""
    replies = app.control.inspect(timeout=1, destination=[worker_name]).query_task(task_ids) or {}
    return {task_id: state for reply in replies.values() for task_id, (state, _) in reply.items()}


@only_on("redis", reason=HANDED_BACK_ON_REDIS_ONLY)
def test_messages_handed_back_on_clean_shutdowns_are_not_counted_as_losses(start_worker, store,
                                                                          key):
    # Given prefetched and countdown (ETA) messages, sent with `expires` (checked on every
    # receipt), behind one running task per worker (priority 9 is served after priority 0)
    waiting = [t.long_running.apply_async((f"{key}-p{i}", 0), priority=9, expires=900)
               for i in range(2)]
    eta = t.long_running.apply_async((f"{key}-eta", 0), countdown=75, priority=9, expires=900)
    held = [r.id for r in (*waiting, eta)]
    cap = 3  # MAX_DELIVERIES in the test settings
    # When a worker receives them and is stopped cleanly (SIGTERM: warm shutdown) while it
    # holds them, MAX_DELIVERIES + 1 times in a row (a few deploys)
    for deploy in range(cap + 1):
        blocker = t.long_running.delay(f"{key}-b{deploy}", 3)
        worker = start_worker(f"deploy{deploy}", concurrency=1)
        name = f"deploy{deploy}@{socket.gethostname()}"
        wait_for(lambda: runs(store, f"{key}-b{deploy}") == 1, 30, message="the blocker to run")

        def held_or_parked():
            if DeadLetter.objects.exists():
                return "parked"
            states = _held_by(name, held)
            return states if len(states) == 3 else None
        states = wait_for(held_or_parked, 30, message="the worker to hold the three messages")
        assert states != "parked", (f"deploy {deploy}: "
                                    f"{list(DeadLetter.objects.values_list('reason', flat=True))}")
        assert states[eta.id] == "scheduled"
        assert {states[r.id] for r in waiting} == {"reserved"}
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=30) == 0
        assert blocker.get(timeout=10) == 1
        assert "Restoring 3 unacknowledged message(s)" in worker.log()
        assert not DeadLetter.objects.exists(), worker.log()[-3000:]
    # Then on the next worker every one of them runs, once, and none is parked
    start_worker("after")
    for result in (*waiting, eta):
        assert result.get(timeout=90) == 1
    assert [runs(store, f"{key}-{n}") for n in ("p0", "p1", "eta")] == [1, 1, 1]
    assert not DeadLetter.objects.exists()


def test_replayed_crash_loop_letter_counts_its_deliveries_from_zero(start_worker, store, key):
    # Given a letter parked by the delivery cap: its task killed its worker on every
    # delivery (MAX_DELIVERIES = 3)
    start_worker()
    result = t.kills_its_worker_on_first_runs.delay(key, 4)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 90,
                      message="poison letter")
    assert "delivered 4 times" in letter.reason and runs(store, key) == 3
    # When the operator replays it and its first replayed run is lost once more (the
    # crash's cause is fixed only from the next run on)
    replay(letter, actor="alice")
    # Then that first redelivery is not parked again: the replay runs again and succeeds
    wait_for(lambda: runs(store, key) >= 5, 60, message="the replay's redelivery to run")
    letter = wait_for(lambda: DeadLetter.objects.filter(
        pk=letter.pk, status=DeadLetter.Status.RESOLVED).first(), 30,
        message="the replayed letter to be resolved")
    assert runs(store, key) == 5
    assert letter.replay_count == 1


@only_on("redis", reason=HANDED_BACK_ON_REDIS_ONLY)
def test_a_clean_shutdown_while_the_database_is_down_still_hands_its_messages_back(
        start_worker, store, key, db_proxy, worker_env):
    # Given a worker that reaches PostgreSQL through a proxy we can cut, holding a
    # countdown message in its memory
    db = worker_env["TEST_DATABASE_URL"].rsplit("@", 1)
    via_proxy = f"{db[0]}@127.0.0.1:{db_proxy.port}/{db[1].split('/', 1)[1]}"
    eta = t.long_running.apply_async((key, 0), countdown=20, expires=900)
    worker = start_worker("cut", env={"TEST_DATABASE_URL": via_proxy})
    name = f"cut@{socket.gethostname()}"
    wait_for(lambda: _held_by(name, [eta.id]) == {eta.id: "scheduled"}, 30,
             message="the worker to hold the countdown message")
    # When the database drops off the network and the worker is stopped cleanly
    db_proxy.cut()
    worker.process.send_signal(signal.SIGTERM)
    # Then the shutdown completes and still gives the message back to the broker; the
    # log says its next delivery will count as a loss
    assert worker.process.wait(timeout=30) == 0
    assert "Restoring 1 unacknowledged message(s)" in worker.log()
    assert "could not record 1 message(s) handed back unused" in worker.log()
    # And the next worker runs it, once
    start_worker("after")
    assert eta.get(timeout=60) == 1
    assert runs(store, key) == 1
    assert not DeadLetter.objects.exists()
def test_body_of_the_wrong_shape_is_parked_and_the_worker_keeps_running(start_worker, store, key):
    # Given a running worker
    worker = start_worker()
    task_id = str(uuid.uuid4())
    # When a message for a known task arrives whose JSON body is not [args, kwargs, embed]
    publish_raw(b'"just a string"', t.flaky_twice.name, task_id)
    # Then it is parked as poison with its raw body, and the worker goes on running tasks
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 30,
                      message="poison letter")
    assert letter.kind == "poison"
    assert letter.raw_body == '"just a string"'
    assert "invalid task message" in letter.reason
    assert t.flaky_twice.delay(key).get(timeout=30) == 3
    assert worker.process.poll() is None
