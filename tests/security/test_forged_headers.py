"""Attacks by a forged ``recovery_history`` header, published as raw messages: strings
where numbers belong, an object where a list belongs, 100,000 entries, nested junk. The
task runs or is parked with a clear reason, no worker crashes, and the letter's admin
page renders for a view-only user."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from recovery.core import bounds
from recovery.core import headers as hdr
from recovery.models import DeadLetter
from tests.integration.conftest import key, start_worker, store, worker_env  # noqa: F401
from tests.integration.harness import wait_for
from tests.integration.test_worker_failures import publish_raw, task_body

from . import replay_tasks as hostile
from .test_replay_options import WITH_HOSTILE_TASKS

pytestmark = pytest.mark.integration


@pytest.fixture
def viewer(client):
    user = get_user_model().objects.create_user("auditor", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client.force_login(user)
    return client


def send(task, key: str, history) -> str:
    task_id = str(uuid.uuid4())
    publish_raw(task_body(key), task.name, task_id, **{hdr.HISTORY: history})
    return task_id


def letter(task_id: str) -> DeadLetter:
    return wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 60,
                    message="parked letter")


def nested(depth: int):
    value: object = "junk"
    for n in range(depth):
        value = {"level": n, "below": [value]}
    return value


STRINGS_FOR_NUMBERS = [{"attempt": "one", "at": 12, "replay": "zero", "kind": ["x"],
                        "delay_seconds": "5", "exception_message": {"not": "text"}}]
NESTED_JUNK = [{"attempt": nested(40), "exception_type": nested(40), "delay_seconds": None,
                "extra": nested(40)}]


@pytest.mark.parametrize("history", [STRINGS_FOR_NUMBERS, NESTED_JUNK],
                         ids=["strings-for-numbers", "nested-junk"])
def test_a_history_with_the_wrong_types_is_parked_cleanly_and_its_page_renders(
        start_worker, store, key, viewer, history):  # noqa: F811
    # Given a worker, and messages whose history holds the wrong types
    start_worker(extra=WITH_HOSTILE_TASKS)
    echo_id = send(hostile.echo_request, key, history)
    refused_id = send(hostile.refuses, key, history)
    # Then a task that succeeds still runs, and one that fails is parked
    wait_for(lambda: store.llen(f"sec:seen:{key}") == 1, 30, message="the task to run")
    parked = letter(refused_id)
    assert not DeadLetter.objects.filter(task_id=echo_id).exists()
    # whose page renders for a view-only user
    page = viewer.get(reverse("admin:recovery_deadletter_change", args=[parked.pk]))
    assert page.status_code == 200
    # with a history of plain values: numbers where numbers belong, text where text does
    for entry in parked.history:
        assert entry.get("delay_seconds") is None or isinstance(entry["delay_seconds"], float)
        assert entry.get("attempt") is None or isinstance(entry["attempt"], int)
        assert isinstance(entry.get("exception_message", ""), str)
        assert len(json.dumps(entry)) < 10_000


def test_a_numeric_string_delay_in_the_history_never_breaks_the_retry_policy(
        start_worker, store, key, viewer):  # noqa: F811
    # Given a task whose policy grows each delay from the previous one, sent a history
    # whose delay is a numeric string (the envelope lets "5" through as a number)
    start_worker(extra=WITH_HOSTILE_TASKS)
    task_id = send(hostile.always_busy, key, [{"attempt": 1, "delay_seconds": "0.2"}])
    # Then it retries by its policy and is parked when it gives up, never lost
    parked = letter(task_id)
    assert not parked.permanent and "gave up after 3 attempts" in parked.reason
    assert int(store.get(f"sec:runs:{key}")) == 2
    assert [e["delay_seconds"] for e in parked.history][:1] == [0.2]
    assert viewer.get(reverse("admin:recovery_deadletter_change",
                              args=[parked.pk])).status_code == 200


def test_a_history_that_is_not_a_list_is_parked_as_poison_with_the_reason(
        start_worker, store, key, viewer):  # noqa: F811
    start_worker(extra=WITH_HOSTILE_TASKS)
    task_id = send(hostile.echo_request, key, {"attempts": 3, "delay_seconds": "soon"})
    parked = letter(task_id)
    assert parked.kind == "poison"
    assert "forged or corrupt recovery_history header" in parked.reason
    assert store.llen(f"sec:seen:{key}") == 0
    page = viewer.get(reverse("admin:recovery_deadletter_change", args=[parked.pk]))
    assert page.status_code == 200


def test_a_history_of_a_hundred_thousand_entries_neither_crashes_nor_is_stored_whole(
        start_worker, store, key, viewer):  # noqa: F811
    # Given messages carrying 100,000 (empty) attempt records
    worker = start_worker(extra=WITH_HOSTILE_TASKS)
    history = [{}] * 100_000
    echo_id = send(hostile.echo_request, key, history)
    refused_id = send(hostile.refuses, key, history)
    # Then the succeeding task runs, the failing one is parked with a bounded history
    wait_for(lambda: store.llen(f"sec:seen:{key}") == 1, 60, message="the task to run")
    parked = letter(refused_id)
    assert not DeadLetter.objects.filter(task_id=echo_id).exists()
    assert len(parked.history) <= bounds.HISTORY_KEEP_FIRST + 1 + bounds.HISTORY_KEEP_LAST
    assert parked.attempts == 100_001
    assert len(json.dumps(parked.headers)) < 100_000
    page = viewer.get(reverse("admin:recovery_deadletter_change", args=[parked.pk]))
    assert page.status_code == 200
    assert worker.process.poll() is None
