"""Attacks by size: a task called with 5 MB, failing with a 1 MB message and traceback, or
carrying a history of 10,000 attempts. Each is parked (never lost, never spooled for
ever) and its letter stays within the documented bounds (recovery.core.bounds)."""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django_celery_results.models import TaskResult

from recovery.core import bounds
from recovery.core import headers as hdr
from recovery.conf import get as setting
from recovery.models import DeadLetter
from recovery.operations.replay import replay
from tests.integration.conftest import key, start_worker, store, worker_env  # noqa: F401
from tests.integration.harness import wait_for

from . import replay_tasks as hostile
from .test_replay_options import WITH_HOSTILE_TASKS

pytestmark = pytest.mark.integration

MB = 1024 * 1024


def parked(task_id: str) -> DeadLetter:
    return wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 60,
                    message="parked letter")


def spooled() -> list[str]:
    spool = settings.RECOVERY["SPOOL_DIR"]
    return os.listdir(spool) if os.path.isdir(spool) else []


def test_a_megabyte_exception_message_and_traceback_are_stored_cut_with_a_marker(
        start_worker, store, key):  # noqa: F811
    # Given a task that fails for good with a 1 MB message (its traceback holds it too),
    # called with a 1 MB argument (within the message limit: kept whole for a replay)
    start_worker(extra=WITH_HOSTILE_TASKS)
    huge = "declined " + "x" * MB
    result = hostile.refuses.delay(key, huge)
    # Then it is parked straight into the table, with the message and traceback cut
    letter = parked(result.id)
    assert not spooled()
    assert len(letter.exception_message) <= setting("MESSAGE_MAX_CHARS")
    assert letter.exception_message.startswith("declined xxx")
    assert letter.exception_message.endswith("chars cut]")
    assert len(letter.traceback) <= setting("TRACEBACK_MAX_CHARS")
    assert letter.traceback.endswith("chars cut]")
    [attempt] = letter.history
    assert len(attempt["exception_message"]) <= setting("MESSAGE_MAX_CHARS")
    assert letter.args == [key, huge]
    # and its result row (django-celery-results) is bounded the same way
    row = wait_for(lambda: TaskResult.objects.filter(task_id=result.id, status="FAILURE").first(),
                   15, message="the FAILURE row")
    assert len(row.traceback or "") <= setting("TRACEBACK_MAX_CHARS")
    assert len(row.result) <= setting("MESSAGE_MAX_CHARS") + 500


def test_a_five_megabyte_payload_is_parked_unrun_with_its_body_whole_and_no_second_copy(
        start_worker, store, key):  # noqa: F811
    # Given a message larger than MAX_MESSAGE_BYTES (4 MiB)
    start_worker(extra=WITH_HOSTILE_TASKS)
    result = hostile.refuses.delay(key, "y" * (5 * MB))
    # Then it is parked as poison before it runs, in the table (not the spool)
    letter = parked(result.id)
    assert letter.kind == "poison" and "too large" in letter.reason
    assert store.get(f"sec:runs:{key}") is None
    assert not spooled()
    # and the body, the only copy of a message that never ran, is kept whole (an operator
    # who raises the limit can replay it), while its decoded arguments are not stored a
    # second time
    limit = setting("MAX_MESSAGE_BYTES")
    assert len(letter.raw_body) > 5 * MB and "y" * 1000 in letter.raw_body
    assert len(str(letter.args)) + len(str(letter.kwargs)) < limit
    assert letter.args == [] and letter.kwargs == {}


def test_a_history_of_ten_thousand_attempts_keeps_the_first_and_last_and_counts_the_rest(
        start_worker, store, key):  # noqa: F811
    # Given a message carrying 10,000 earlier attempts, for a task that fails for good
    start_worker(extra=WITH_HOSTILE_TASKS)
    history = [{"attempt": n, "at": "2026-01-01T00:00:00+00:00", "replay": 0, "kind": "dependency",
                "exception_type": "E", "exception_message": f"attempt {n}", "delay_seconds": 0.1}
               for n in range(1, 10_001)]
    result = hostile.refuses.apply_async((key,), headers={hdr.HISTORY: history})
    # Then the letter keeps the first and the last attempts, and says how many it left out
    letter = parked(result.id)
    assert not spooled()
    first, last = bounds.HISTORY_KEEP_FIRST, bounds.HISTORY_KEEP_LAST
    assert len(letter.history) == first + 1 + last
    assert [e["attempt"] for e in letter.history[:first]] == list(range(1, first + 1))
    dropped = letter.history[first]
    assert dropped["dropped"] == 10_001 - first - last
    assert f"{10_001 - first - last} attempts left out" in dropped["exception_message"]
    assert letter.history[-1]["attempt"] == 10_001
    assert letter.history[-1]["exception_message"] == "refused"
    assert letter.attempts == 10_001


def test_an_oversized_message_replays_with_its_whole_body_once_the_limit_is_raised(
        start_worker, store, key):  # noqa: F811
    # Given a 5 MB message refused before it ran, parked with its body and no second copy
    strict = start_worker("strict", extra=WITH_HOSTILE_TASKS)
    result = hostile.measures.delay(key, "y" * (5 * MB))
    letter = parked(result.id)
    assert letter.kind == "poison" and letter.args == [] and len(letter.raw_body) > 5 * MB
    strict.stop()
    # When the limit is raised and an operator replays the letter
    start_worker("roomy", extra=WITH_HOSTILE_TASKS,
                 env={"RECOVERY_MAX_MESSAGE_BYTES": str(8 * MB)})
    replay(letter, actor="op")
    # Then the task runs with the argument it was sent, and the letter is resolved
    wait_for(lambda: store.get(f"sec:size:{key}") == str(5 * MB).encode(), 60,
             message="the replayed task to be handed the 5 MB payload")
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).status == "resolved", 30,
             message="the letter to be resolved")
