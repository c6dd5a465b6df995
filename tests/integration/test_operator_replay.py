"""Operators on real workers: park, replay from the admin (as is, or with a fixed payload), resolved."""

from __future__ import annotations

import pytest
from celery.result import AsyncResult
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from recovery.models import DeadLetter

from . import worker_tasks as t
from .harness import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create_user("night-shift", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_deadletter", "change_deadletter", "replay_deadletter")))
    client.force_login(user)
    return client


def test_park_then_replay_from_the_admin_then_resolved(start_worker, store, key, operator):
    # Given a task parked because its price list was corrupt
    start_worker()
    result = t.times_ten_unless_broken.delay(4, key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="parked letter")
    # When the data is fixed and an operator replays it from the admin
    store.set(f"t:fixed:{key}", 1)
    page = operator.post(reverse("admin:recovery_deadletter_replay", args=[letter.pk]),
                         {"args": f'[4, "{key}"]', "kwargs": "{}", "note": "price list restored"},
                         follow=True)
    assert "was replayed" in page.content.decode()
    # Then the replayed run succeeds under the same id and the letter is resolved
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.RESOLVED,
             30, message="resolved letter")
    assert AsyncResult(result.id).get(timeout=10) == 40
    assert list(DeadLetter.objects.get(pk=letter.pk).events.values_list("action", "actor")) == [
        ("replayed", "night-shift")]


def test_park_then_edit_the_payload_then_replay_then_resolved(start_worker, store, key, operator):
    # Given a task parked because it pointed at a corrupt price list (a bad payload)
    start_worker()
    result = t.times_ten_unless_broken.delay(5, key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="parked letter")
    # When the operator edits the payload to point at a good price list, and replays
    good_key = key + "-good"
    store.set(f"t:fixed:{good_key}", 1)
    operator.post(reverse("admin:recovery_deadletter_replay", args=[letter.pk]),
                  {"args": f'[5, "{good_key}"]', "kwargs": "{}", "note": "pointed at v2 prices"})
    # Then the replayed run uses the edited payload, succeeds, and the letter is resolved
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.RESOLVED,
             30, message="resolved letter")
    assert AsyncResult(result.id).get(timeout=10) == 50
    assert int(store.get(f"t:runs:{good_key}") or 0) == 1
    letter.refresh_from_db()
    assert letter.args == [5, good_key]
    edit = letter.events.get(action="edited")
    assert edit.before["args"] == [5, key] and edit.after["args"] == [5, good_key]


def test_park_then_compensate_from_the_admin_runs_the_compensation_once(
        start_worker, store, key, client):
    # Given a booking that reserved a seat and then failed for good
    user = get_user_model().objects.create_user("day-shift", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_deadletter", "compensate_deadletter")))
    client.force_login(user)
    start_worker()
    result = t.book_seat.delay(key, "12A")
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="parked letter")
    assert store.smembers(f"t:reserved:{key}") == {b"12A"}
    # When an operator compensates it from the admin (confirmation page, then yes)
    url = reverse("admin:recovery_deadletter_compensate", args=[letter.pk])
    assert "release_seat" in client.get(url).content.decode()
    page = client.post(url, {"note": "customer refunded"}, follow=True)
    assert "was compensated" in page.content.decode()
    # Then the compensation ran on the worker once, with the letter's payload and its
    # stable idempotency key, and the seat is free again
    wait_for(lambda: store.llen(f"t:compensations:{key}") == 1, 30, message="compensation run")
    assert store.lrange(f"t:compensations:{key}", 0, -1) == [
        f"{result.id}.compensation|{result.id}".encode()]
    assert store.smembers(f"t:reserved:{key}") == set()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.COMPENSATED
    assert list(letter.events.values_list("action", "actor", "note")) == [
        ("compensated", "day-shift", "customer refunded")]
    assert not DeadLetter.objects.filter(task_id=f"{result.id}.compensation").exists()
