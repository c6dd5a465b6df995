"""Attacks on replay: a stored letter is input, so a replay takes only an allow-list of
options from it, publishes only to queues the app knows, and never leaves a letter stuck.

Real workers (tests/integration harness), real PostgreSQL and Redis; the operator acts
through the admin with the test client, or through ``manage.py dlq``.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.urls import reverse

from recovery.operations import replay as service
from recovery.operations import replay_options
from recovery.models import DeadLetter
from tests.integration.conftest import key, start_worker, store, worker_env  # noqa: F401
from tests.integration.harness import wait_for
from tests.integration.test_worker_failures import publish_raw, task_body

from . import replay_tasks as hostile

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

#: the worker knows the hostile-input tasks besides the integration ones
WITH_HOSTILE_TASKS = ("-I", "tests.integration.worker_tasks,tests.security.replay_tasks")


@pytest.fixture
def replayer(client):
    user = get_user_model().objects.create_user("night-shift", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_deadletter", "replay_deadletter")))
    client.force_login(user)
    return client


def letter_of(key: str, **overrides) -> DeadLetter:
    values = dict(task_id=f"sec-{key}-{uuid.uuid4().hex[:6]}", task_name=hostile.echo_request.name,
                  args=[key], kwargs={}, kind="dependency", fingerprint="5" * 40, queue="celery",
                  exception_type="recovery.errors.DependencyError", exception_message="503")
    values.update(overrides)
    return DeadLetter.objects.create(**values)


def seen(store, key: str) -> list[dict]:  # noqa: F811
    return [json.loads(raw) for raw in store.lrange(f"sec:seen:{key}", 0, -1)]


def resolved(letter: DeadLetter) -> bool:
    return DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.RESOLVED


def replay_form(letter: DeadLetter, queue: str = "") -> dict:
    return {"args": json.dumps(letter.args), "kwargs": json.dumps(letter.kwargs),
            "queue": queue, "note": ""}


def test_a_replay_never_runs_the_links_chain_or_errbacks_a_stored_letter_carries(
        start_worker, store, key):  # noqa: F811
    # Given a letter whose stored options link, chain and errback to a task that would write
    # a marker, send replies elsewhere and carry a header of the attacker's
    start_worker(extra=WITH_HOSTILE_TASKS)
    trap = dict(hostile.mark.si(key))
    letter = letter_of(key, headers={
        "link": [trap], "link_error": [trap], "chain": [trap], "reply_to": "attacker-replies",
        "expires": "2020-01-01T00:00:00+00:00", "headers": {"x-evil": "1"},
    })
    # When an operator replays it with `dlq replay`
    call_command("dlq", "replay", "--ids", str(letter.pk), "--yes")
    # Then the task runs once and the letter is resolved, and its message carried none of them
    wait_for(lambda: resolved(letter), 30, message="resolved letter")
    [run] = seen(store, key)
    assert run["callbacks"] is None and run["errbacks"] is None and run["chain"] is None
    assert run["reply_to"] != "attacker-replies" and run["x_evil"] is None
    time.sleep(2)
    assert store.get(f"sec:marker:{key}") is None, "the linked task ran"


def test_a_replay_never_follows_a_stored_foreign_exchange_or_routing_key(start_worker, store, key):  # noqa: F811
    # Given a letter whose stored options point at an exchange the attacker chose
    start_worker(extra=WITH_HOSTILE_TASKS)
    letter = letter_of(key, headers={"exchange": "attacker", "routing_key": "attacker",
                                     "priority": 3})
    # When it is replayed from the admin
    call_command("dlq", "replay", "--ids", str(letter.pk), "--yes")
    # Then it is published to its own queue through the app's own exchange, runs, resolves
    wait_for(lambda: resolved(letter), 30, message="resolved letter (not lost to 'attacker')")
    [run] = seen(store, key)
    assert run["exchange"] in ("", None) and run["routing_key"] == "celery"


def test_a_replay_to_a_queue_the_app_does_not_know_is_refused_and_the_letter_stays_parked(
        broker, replayer, key):  # noqa: F811
    letter = letter_of(key)
    # `dlq replay --queue` naming a queue nobody declared or routes to
    with pytest.raises(CommandError, match="'attacker-queue' is not one this app declares"):
        call_command("dlq", "replay", "--ids", str(letter.pk), "--queue", "attacker-queue",
                     "--yes")
    # the admin replay form, the same
    page = replayer.post(reverse("admin:recovery_deadletter_replay", args=[letter.pk]),
                         replay_form(letter, queue="attacker-queue"))
    assert page.status_code == 200
    assert "is not one this app declares or routes to" in page.content.decode()
    # the service itself
    with pytest.raises(service.ReplayError, match="not one this app declares"):
        service.replay(letter, queue="attacker-queue")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and letter.replay_count == 0
    assert broker.llen("attacker-queue") == 0 and broker.llen("celery") == 0


def test_a_letter_parked_from_a_queue_the_app_does_not_know_is_not_replayed_there(broker, key):  # noqa: F811
    letter = letter_of(key, queue="attacker-queue")
    with pytest.raises(CommandError, match="could not be replayed"):
        call_command("dlq", "replay", "--ids", str(letter.pk), "--yes")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and letter.replay_count == 0
    assert broker.llen("attacker-queue") == 0
    # Sent to a queue the app knows instead, it is replayed
    call_command("dlq", "replay", "--ids", str(letter.pk), "--queue", "celery", "--yes")
    assert DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.REPLAYING
    assert broker.llen("celery") == 1


def test_poison_letters_replay_from_the_admin_and_dlq_and_resolve_on_a_real_worker(
        start_worker, store, key, replayer):  # noqa: F811
    # Given two messages for a task the worker did not know yet: parked as poison, with the
    # raw message headers (argsrepr, kwargsrepr, timelimit, ...) as their stored options
    old = start_worker("old")
    first, second = (hostile.echo_request.apply_async((f"{key}-{n}",)) for n in (1, 2))
    letters = [wait_for(lambda r=r: DeadLetter.objects.filter(task_id=r.id).first(), 30,
                        message="poison letter") for r in (first, second)]
    assert all(letter.kind == "poison" for letter in letters)
    old.stop()
    # When the task is deployed and an operator replays one from the admin, one with dlq
    start_worker("new", extra=WITH_HOSTILE_TASKS)
    page = replayer.post(reverse("admin:recovery_deadletter_replay", args=[letters[0].pk]),
                         replay_form(letters[0]), follow=True)
    assert page.status_code == 200 and "was replayed" in page.content.decode()
    call_command("dlq", "replay", "--ids", str(letters[1].pk), "--yes")
    # Then both run and are resolved: never stuck replaying
    for letter in letters:
        wait_for(lambda letter=letter: resolved(letter), 30, message="resolved poison letter")
    assert [len(seen(store, f"{key}-{n}")) for n in (1, 2)] == [1, 1]


def test_a_letter_whose_body_could_not_be_decoded_is_refused_and_stays_parked(
        start_worker, store, key, replayer):  # noqa: F811
    # Given a message whose body no worker could decode, parked as poison
    start_worker()
    task_id = str(uuid.uuid4())
    publish_raw(b'{"this is": not json', hostile.echo_request.name, task_id)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 30,
                      message="poison letter")
    # When an operator replays it from the admin, and with dlq
    page = replayer.post(reverse("admin:recovery_deadletter_replay", args=[letter.pk]),
                         replay_form(letter))
    # Then both say why they cannot, and the letter stays parked, unchanged
    assert page.status_code == 200
    assert "cannot replay letter" in page.content.decode()
    assert "body not decodable" in page.content.decode()
    with pytest.raises(CommandError, match="could not be replayed"):
        call_command("dlq", "replay", "--ids", str(letter.pk), "--yes")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and letter.replay_count == 0
    assert letter.raw_body == '{"this is": not json'


def test_a_forged_body_shape_is_refused_too(start_worker, store, key):  # noqa: F811
    # A body that decodes as JSON but is not [args, kwargs, embed] holds no arguments either
    start_worker()
    task_id = str(uuid.uuid4())
    publish_raw(json.dumps({"args": [key]}).encode(), hostile.echo_request.name, task_id)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), 30,
                      message="poison letter")
    with pytest.raises(service.ReplayError, match="body not decodable"):
        service.replay(letter)
    assert DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.PARKED
    # while a decodable poison body (an unknown task) keeps its arguments for a replay
    good_id = str(uuid.uuid4())
    publish_raw(task_body(key), hostile.echo_request.name, good_id)
    good = wait_for(lambda: DeadLetter.objects.filter(task_id=good_id).first(), 30,
                    message="poison letter")
    assert good.args == [key]


def test_a_letter_parked_from_a_queue_a_live_worker_consumes_replays_there(
        start_worker, store, key):  # noqa: F811
    # Given a worker consuming a queue no setting declares (celery worker -Q reports), and
    # a letter parked from it
    start_worker(extra=(*WITH_HOSTILE_TASKS, "-Q", "reports"))
    replay_options._consumed.clear()
    letter = letter_of(key, queue="reports")
    # When an operator replays it to its own queue
    call_command("dlq", "replay", "--ids", str(letter.pk), "--yes")
    # Then it runs there (the only worker consumes nothing else) and is resolved
    wait_for(lambda: resolved(letter), 30, message="the replay to run on the reports queue")
    assert [entry["routing_key"] for entry in seen(store, key)] == ["reports"]
