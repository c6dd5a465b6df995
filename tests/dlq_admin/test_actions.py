"""Operator actions in the admin, through the Django test client, on PostgreSQL and Redis."""

from __future__ import annotations

import json

import pytest
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from recovery.models import DeadLetter, DeadLetterEvent, Effect

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"  # charge_payment(self, order_id, amount_cents)
CHANGELIST = "admin:recovery_deadletter_changelist"


def make(n: int, **overrides) -> DeadLetter:
    values = dict(task_id=f"t-{n}", task_name=TASK, args=[n, 500], kwargs={},
                  fingerprint="d" * 40, kind="dependency", exception_type="DependencyError",
                  exception_message="declined")
    values.update(overrides)
    return DeadLetter.objects.create(**values)


def operator(client, *codenames):
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_deadletter", *codenames)))
    client.force_login(user)
    return client


def post_action(client, action, letters, confirm=False, note=""):
    data = {"action": action, helpers.ACTION_CHECKBOX_NAME: [str(x.pk) for x in letters]}
    if confirm:
        data.update(post="yes", note=note)
    return client.post(reverse(CHANGELIST), data, follow=confirm)


def test_bulk_replay_asks_for_confirmation_then_replays_with_one_message(client, broker):
    c = operator(client, "replay_deadletter")
    letters = [make(1), make(2), make(3, status=DeadLetter.Status.RESOLVED)]
    page = post_action(c, "replay_selected", letters)
    assert page.status_code == 200
    assert "You are about to replay 2 parked dead letters" in page.content.decode()
    assert broker.llen("celery") == 0 and not DeadLetterEvent.objects.exists()
    done = post_action(c, "replay_selected", letters, confirm=True, note="after deploy 412")
    assert "2 dead letters were replayed." in done.content.decode()
    assert broker.llen("celery") == 2
    assert DeadLetterEvent.objects.filter(action="replayed", actor="op",
                                          note="after deploy 412").count() == 2
    assert DeadLetter.objects.get(task_id="t-3").status == DeadLetter.Status.RESOLVED


@pytest.mark.parametrize("action, status", [("discard_selected", "discarded"),
                                            ("resolve_selected", "resolved")])
def test_bulk_discard_and_resolve(client, broker, action, status):
    c = operator(client, "discard_deadletter", "resolve_deadletter")
    letters = [make(1)]
    done = post_action(c, action, letters, confirm=True)
    assert f"1 dead letter was {status}." in done.content.decode()
    assert DeadLetter.objects.get().status == status


def test_an_action_without_its_permission_changes_nothing(client, broker):
    c = operator(client)  # view only
    letter = make(1)
    response = post_action(c, "replay_selected", [letter], confirm=True)
    # The action is not offered to this user: the post falls back to the plain list.
    assert "were replayed" not in response.content.decode()
    changelist = c.get(reverse(CHANGELIST)).content.decode()
    assert "replay_selected" not in changelist
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and broker.llen("celery") == 0
    assert c.get(reverse("admin:recovery_deadletter_replay", args=[letter.pk])).status_code == 403
    assert c.post(reverse("admin:recovery_deadletter_discard", args=[letter.pk])
                  ).status_code == 403
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED


def test_replay_form_with_malformed_json_shows_an_error_and_changes_nothing(client, broker):
    c = operator(client, "replay_deadletter", "change_deadletter")
    letter = make(1)
    url = reverse("admin:recovery_deadletter_replay", args=[letter.pk])
    for args, kwargs, error in (
        ("[1, ", "{}", "Not valid JSON"),
        ('{"a": 1}', "{}", "args must be a JSON list"),
        ("[1]", "[]", "kwargs must be a JSON object"),
        ("[1, 2, 3]", "{}", "arguments do not fit"),
    ):
        page = c.post(url, {"args": args, "kwargs": kwargs})
        assert page.status_code == 200
        assert error in page.content.decode()
    letter.refresh_from_db()
    assert letter.args == [1, 500] and letter.status == DeadLetter.Status.PARKED
    assert broker.llen("celery") == 0 and not DeadLetterEvent.objects.exists()


def test_replay_form_saves_an_edited_payload_audits_it_and_replays(client, broker):
    c = operator(client, "replay_deadletter", "change_deadletter")
    letter = make(1)
    url = reverse("admin:recovery_deadletter_replay", args=[letter.pk])
    assert json.dumps([1, 500], indent=2) in c.get(url).content.decode().replace("&quot;", '"')
    page = c.post(url, {"args": "[1]", "kwargs": '{"amount_cents": 90}', "note": "fixed amount"},
                  follow=True)
    assert "was replayed with the edited payload" in page.content.decode()
    letter.refresh_from_db()
    assert (letter.args, letter.kwargs, letter.status) == ([1], {"amount_cents": 90}, "replaying")
    edit = letter.events.get(action="edited")
    assert edit.before == {"args": [1, 500], "kwargs": {}} and edit.actor == "op"
    assert broker.llen("celery") == 1


def test_editing_the_payload_needs_the_change_permission(client, broker):
    c = operator(client, "replay_deadletter")
    letter = make(1)
    url = reverse("admin:recovery_deadletter_replay", args=[letter.pk])
    assert c.post(url, {"args": "[1, 90]", "kwargs": "{}"}).status_code == 403
    letter.refresh_from_db()
    assert letter.args == [1, 500] and broker.llen("celery") == 0
    # The stored payload can still be replayed as it is.
    c.post(url, {"args": "[1, 500]", "kwargs": "{}"})
    assert broker.llen("celery") == 1


def test_detail_page_offers_only_the_permitted_operations_and_shows_the_audit_trail(client, broker):
    c = operator(client, "discard_deadletter")
    letter = make(1)
    DeadLetterEvent.objects.create(letter=letter, action="replay_failed", actor="bob",
                                   outcome="could not publish: broker down")
    page = c.get(reverse("admin:recovery_deadletter_change", args=[letter.pk])).content.decode()
    assert "Discard…" in page and "Replay…" not in page
    assert "could not publish: broker down" in page


def test_audit_events_cannot_be_edited_or_deleted(admin_client, broker):
    letter = make(1)
    DeadLetterEvent.objects.create(letter=letter, action="discarded", actor="bob")
    page = admin_client.get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    assert 'name="events-0-DELETE"' not in page.content.decode()
    assert DeadLetterEvent.objects.count() == 1


def test_replay_form_may_ask_for_the_effects_to_run_again_and_audits_it(client, broker):
    # Given a parked letter whose task had committed an effect before it failed
    c = operator(client, "replay_deadletter")
    letter = make(1)
    Effect.objects.create(task_id=letter.task_id, name="charge", task_name=letter.task_name)
    url = reverse("admin:recovery_deadletter_replay", args=[letter.pk])
    assert "Run its effects again" in c.get(url).content.decode()
    # When the operator replays it asking for the effects to run again
    page = c.post(url, {"args": "[1, 500]", "kwargs": "{}", "rerun_effects": "on",
                        "note": "refunded by hand"}, follow=True)
    # Then the replay is published with a new generation of effects, and the audit says so
    assert "was replayed, its effects to run again" in page.content.decode()
    letter.refresh_from_db()
    assert letter.status == "replaying"
    assert letter.headers["headers"]["recovery_effects_generation"] == 1
    event = letter.events.get(action=DeadLetterEvent.Action.EFFECTS_RERUN)
    assert event.actor == "op"
    message = json.loads(broker.lindex("celery", 0))
    assert message["headers"]["recovery_effects_generation"] == 1


def test_a_replay_from_the_form_skips_committed_effects_unless_asked(client, broker):
    c = operator(client, "replay_deadletter")
    letter = make(2)
    Effect.objects.create(task_id=letter.task_id, name="charge", task_name=letter.task_name)
    c.post(reverse("admin:recovery_deadletter_replay", args=[letter.pk]),
           {"args": "[2, 500]", "kwargs": "{}"})
    assert not DeadLetterEvent.objects.filter(action=DeadLetterEvent.Action.EFFECTS_RERUN).exists()
    message = json.loads(broker.lindex("celery", 0))
    assert "recovery_effects_generation" not in message["headers"]
