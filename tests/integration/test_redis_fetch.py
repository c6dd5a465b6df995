"""A worker killed the moment it has taken a message off a Redis queue does not take the
message with it (recovery.delivery.redis_fetch).

The kill is made exact: a consumer process whose transport exits (status 9, no clean-up,
as SIGKILL) as soon as a message is handed to it, before it can do anything else with
it. With kombu's own BRPOP, that is after the pop and before the message is recorded as
held: it is lost (the control test shows it). With recovery's fetch the pop and the record
are one step, and a live worker gets the message back after the visibility timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from kombu import Connection

from config.celery import app
from recovery.delivery.redis_fetch import MALFORMED_LIST

from . import worker_tasks as t
from .harness import ROOT, wait_for
from .test_retry_and_park import runs
from ..brokers import only_on

pytestmark = only_on("redis", reason="kombu's Redis transport takes a message and records it "
                                     "as held in two steps; the other brokers hold it themselves")

_DIES_ON_DELIVERY = textwrap.dedent("""
    import os, sys
    from kombu import Connection, Exchange, Queue
    from kombu.transport import redis as kombu_redis
    if sys.argv[2] == "recovery":
        from recovery.delivery import redis_fetch
        redis_fetch.install()
    # The process dies the moment a message is handed to it: nothing after the take runs.
    kombu_redis.Transport._deliver = lambda self, message, queue: os._exit(9)
    with Connection(sys.argv[1]) as connection:
        queue = Queue("celery", Exchange("celery", type="direct"), routing_key="celery")
        with connection.Consumer(queue, callbacks=[lambda body, message: None]):
            connection.drain_events(timeout=20)
    sys.exit("no message arrived")
""")


def _consume_and_die(fetch: str) -> None:
    process = subprocess.run([sys.executable, "-c", _DIES_ON_DELIVERY, app.conf.broker_url, fetch],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 9, process.stderr[-3000:]


def _queued(store) -> int:
    return store.llen("celery")


def test_kombus_own_poll_loses_a_message_whose_consumer_dies_right_after_taking_it(store, key):
    """The control: what the fetch below prevents is real (kombu#305)."""
    t.add_one.apply_async((1,), task_id=f"lost-{key}")
    _consume_and_die("kombu")
    assert _queued(store) == 0 and store.hlen("unacked") == 0, "kombu's pop left no trace"


def test_a_message_whose_worker_dies_right_after_taking_it_runs_on_another(start_worker, store,
                                                                         key):
    # Given a task message, taken by a consumer that is killed the moment it has it
    result = t.flaky_twice.delay(key)
    _consume_and_die("recovery")
    # Then the message is held for it, not lost
    assert _queued(store) == 0
    assert store.hlen("unacked") == 1
    # And a live worker runs it once the visibility timeout (12 s in the tests) has passed
    start_worker()
    assert result.get(timeout=90) == 3
    assert runs(store, key) == 3
    wait_for(lambda: store.hlen("unacked") == 0, 10, message="every delivery acknowledged")


def test_an_envelope_that_is_not_kombus_is_set_aside_and_the_worker_keeps_consuming(
        start_worker, store, key):
    # Given a worker, and something on its queue that is not a kombu message at all
    worker = start_worker()
    with Connection(app.conf.broker_url) as connection:
        client = connection.default_channel.client
        client.lpush("celery", f"not json {key}")
        client.lpush("celery", '{"properties": "a string"}')
    # When a real task follows
    result = t.flaky_twice.delay(key)
    # Then the task runs, and both foreign entries are kept, unread, on the malformed list
    assert result.get(timeout=60) == 3
    kept = {item.decode() for item in store.lrange(MALFORMED_LIST, 0, -1)}
    assert kept == {f"not json {key}", '{"properties": "a string"}'}
    assert worker.log().count("is not a kombu message") == 2
    assert worker.process.poll() is None


@pytest.fixture(autouse=True)
def _no_malformed_leftovers(store):
    store.delete(MALFORMED_LIST)
    yield
    store.delete(MALFORMED_LIST)


def test_the_poll_sends_the_script_by_its_hash_and_survives_a_flushed_script_cache(
        start_worker, store, key):
    # Given a worker that has taken a task (its poll sent the script whole once)
    worker = start_worker()
    assert t.flaky_twice.delay(f"{key}-1").get(timeout=60) == 3
    calls_before = store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    # When the server forgets every script (as after a restart without persistence)
    store.script_flush()
    # Then the next tasks still run, on the same one-step fetch (no fall-back to BRPOP),
    # and the polls after the first send the script's hash, not the script
    assert t.flaky_twice.delay(f"{key}-2").get(timeout=60) == 3
    assert t.flaky_twice.delay(f"{key}-3").get(timeout=60) == 3
    assert store.info("commandstats")["cmdstat_evalsha"]["calls"] > calls_before
    # and, the script cached again, an idle worker's polls send only its hash
    polls = _polls_for(store, seconds=3)
    assert [name for name in polls if name == "EVALSHA"], polls
    assert "EVAL" not in polls, polls
    assert "cannot take a message and record it in one step" not in worker.log()
    assert worker.process.poll() is None


def _polls_for(store, seconds: float) -> list[str]:
    """The script commands (EVAL or EVALSHA) that took from this broker's queues, as
    MONITOR saw them for ``seconds`` (server-wide command counts would include other
    clients' scripts)."""
    import threading

    db = store.connection_pool.connection_kwargs.get("db", 0)
    seen: list[str] = []
    done = threading.Event()

    def watch():
        with store.monitor() as monitor:
            deadline = time.monotonic() + seconds
            for command in monitor.listen():
                text = command.get("command", "")
                name = text.split(" ", 1)[0].upper()
                if int(command.get("db", -1)) == db and name in ("EVAL", "EVALSHA") \
                        and "unacked" in text:
                    seen.append(name)
                if time.monotonic() > deadline:
                    break
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(seconds)
    store.ping()  # one more command, so the monitor wakes up past its deadline
    assert done.wait(10)
    return seen
