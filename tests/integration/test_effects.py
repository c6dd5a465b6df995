"""Effects that happen once (issue 15): real workers, pool children SIGKILLed after the
effect committed and before the broker heard the acknowledgement."""

from __future__ import annotations

import os
import signal
import time

import pytest
from celery import states
from django.core.management import call_command
from django.db import connection

from recovery.models import DeadLetter, DeadLetterEvent, Effect
from recovery.operations.replay import replay

from . import worker_tasks as t
from .harness import wait_for
from .test_retry_and_park import result_state

pytestmark = pytest.mark.integration

TASKS = 60          # of each kind
HOLD = 30           # at most, seconds a task waits in its window for the test to decide
KILLS = 10          # pool children killed in that window, per kind


@pytest.fixture
def probe_table(transactional_db):
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS effect_probe")
        cursor.execute("CREATE TABLE effect_probe (probe text, kind text, i int, task_id text)")
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS effect_probe")


def _rows(probe: str, kind: str) -> dict[int, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT i, count(*) FROM effect_probe WHERE probe = %s AND kind = %s "
                       "GROUP BY i", [probe, kind])
        return dict(cursor.fetchall())


def _kill_in_the_window(store, key: str, worker, timeout: float = 180) -> dict[str, set[int]]:
    """SIGKILL the pool child of KILLS tasks of each kind while it holds a committed effect
    unacknowledged, each task at most once (three deliveries would park it as poison);
    release every other run from its window. Returns once every task and every redelivery
    of a killed one has passed its window."""
    killed: dict[str, set[int]] = {"once": set(), "plain": set()}
    deadline = time.monotonic() + timeout
    while True:
        entry = store.lpop(f"t:window:{key}")
        if entry is None:
            expected = 2 * TASKS + len(killed["once"]) + len(killed["plain"])
            if _windows(store, key) >= expected and not store.llen(f"t:window:{key}"):
                return killed
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s: {_windows(store, key)} of "
                                     f"{expected} runs reached their window; killed {killed}")
            time.sleep(0.02)
            continue
        kind, i, pid = entry.decode().split(":")
        if (len(killed[kind]) < KILLS and int(i) not in killed[kind]
                and int(pid) in worker.child_pids()):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
            else:
                killed[kind].add(int(i))
                continue
        store.rpush(f"t:release:{key}:{entry.decode()}", 1)


def test_effects_behind_self_effect_happen_once_when_children_are_killed_mid_task(
        start_worker, store, key, probe_table):
    # Given a worker and, interleaved, tasks that write a row behind self.effect and the
    # same tasks writing it plainly, every one holding its commit unacknowledged a while
    worker = start_worker(concurrency=2)
    for i in range(TASKS):
        t.writes_once.delay(key, i, HOLD)
        t.writes_plain.delay(key, i, HOLD)

    # When pool children are SIGKILLed after the write committed, before the acknowledgement
    killed = _kill_in_the_window(store, key, worker)
    # Then every task finishes, each kind lost the same number of acknowledgements, and
    # the plain tasks wrote their rows twice where the effects wrote them once
    assert len(killed["once"]) == len(killed["plain"]) == KILLS, killed
    assert _windows(store, key) == 2 * TASKS + 2 * KILLS
    once, plain = _rows(key, "once"), _rows(key, "plain")
    duplicated_once = sum(count - 1 for count in once.values())
    duplicated_plain = sum(count - 1 for count in plain.values())
    print(f"\nkilled {KILLS} children after the commit, per kind: duplicated database effects "
          f"{duplicated_once} with self.effect, {duplicated_plain} without")
    assert duplicated_once == 0, once
    assert duplicated_plain == KILLS, plain
    assert set(once) == set(plain) == set(range(TASKS))
    assert Effect.objects.filter(name="probe", task_name=t.writes_once.name).count() == TASKS
    assert not DeadLetter.objects.filter(task_name__in=(t.writes_once.name,
                                                        t.writes_plain.name)).exists()


def _windows(store, key: str) -> int:
    """How many runs reached the window (a killed run counts, its redelivery again)."""
    return int(store.get(f"t:windows:{key}") or 0)


def test_a_replay_skips_the_committed_effect_unless_asked_to_run_it_again(start_worker, store,
                                                                          key, probe_table):
    # Given a task that commits its charge, then fails for good and is parked
    start_worker()
    result = t.charges_then_fails.delay(key, True)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 60,
                      message="letter")
    assert _rows(key, "charge") == {0: 1}
    # When the cause is fixed and the letter replayed
    store.set(f"t:heal:{key}", 1)
    replay(letter, actor="alice")
    wait_for(lambda: result_state(result.id) == states.SUCCESS, 60, message="replay succeeded")
    assert result.get(timeout=10) == store.lindex(f"t:keys:{key}", 0).decode()
    # Then the replay finished the task without charging again, under the same key
    assert _rows(key, "charge") == {0: 1}
    keys = [k.decode() for k in store.lrange(f"t:keys:{key}", 0, -1)]
    assert len(keys) == 2 and keys[0] == keys[1]

    # Given the same failure parked again (the heal undone)
    store.delete(f"t:heal:{key}")
    again = t.charges_then_fails.delay(key, True)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=again.id).first(), 60,
                      message="second letter")
    store.set(f"t:heal:{key}", 1)
    # When an operator replays it from the shell asking for its effects to run again
    call_command("dlq", "replay", "--task-id", again.id, "--rerun-effects", "--yes",
                 "--note", "charge was refunded by hand")
    # Then the charge is written again, under a new idempotency key, and audited
    wait_for(lambda: result_state(again.id) == states.SUCCESS, 60, message="replay succeeded")
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM effect_probe WHERE probe = %s AND task_id = %s",
                       [key, again.id])
        assert cursor.fetchone()[0] == 2
    keys = [k.decode() for k in store.lrange(f"t:keys:{key}", 2, -1)]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert list(Effect.objects.filter(task_id=again.id).order_by("generation")
                .values_list("generation", flat=True)) == [0, 1]
    event = DeadLetterEvent.objects.get(letter__task_id=again.id,
                                        action=DeadLetterEvent.Action.EFFECTS_RERUN)
    assert event.note == "charge was refunded by hand"
    assert event.actor.startswith("cli:")
