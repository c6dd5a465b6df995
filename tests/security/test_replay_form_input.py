"""Attack: hostile input to the replay form and the replay of a hostile letter, by an
operator who may replay: a posted payload nested 100,000 deep, a poison letter whose body
is nested 10,000 deep, and a saga step's letter holding a value only its saga declares
secret. Each gets a clear answer, never a 500, and the letter stays as it was."""

from __future__ import annotations

import pytest
from django.urls import reverse

from recovery.operations import replay
from recovery.models import DeadLetter

from . import secret_tasks
from .test_deep_payloads import DEEP_JSON

pytestmark = pytest.mark.django_db(transaction=True)


def replay_url(letter: DeadLetter) -> str:
    return reverse("admin:recovery_deadletter_replay", args=[letter.pk])


def test_a_posted_payload_nested_too_deep_is_a_form_error(staff_client):
    letter = DeadLetter.objects.create(task_id="rf-1", task_name=secret_tasks.charge_card.name,
                                       args=[1], kwargs={}, fingerprint="a" * 40)
    client = staff_client("replay_deadletter", "change_deadletter")
    response = client.post(replay_url(letter), {"args": "[" * 100_000, "kwargs": "{}",
                                                "queue": "", "note": ""})
    assert response.status_code == 200
    assert "Nested too deep to read" in response.content.decode()
    letter.refresh_from_db()
    assert letter.status == "parked" and letter.args == [1]


def test_a_poison_letter_with_a_body_nested_too_deep_is_refused_not_a_500(staff_client):
    letter = DeadLetter.objects.create(task_id="rf-2", task_name=secret_tasks.charge_card.name,
                                       kind="poison", raw_body=DEEP_JSON,
                                       content_type="application/json", fingerprint="b" * 40)
    client = staff_client("replay_deadletter")
    response = client.post(replay_url(letter), {"args": "[]", "kwargs": "{}", "queue": "",
                                                "note": ""})
    assert response.status_code == 200
    assert "body not decodable" in response.content.decode()
    result = replay.bulk("replay", DeadLetter.objects.filter(pk=letter.pk), actor="op")
    assert (result.done, result.failed) == (0, 1)
    letter.refresh_from_db()
    assert letter.status == "parked"


def test_the_replay_form_masks_a_value_only_the_saga_declares_secret(staff_client):
    letter = DeadLetter.objects.create(
        task_id="saga-9-1-step", task_name="tasks.orders.charge_payment",
        args=[{"order_id": 1, "maiden_name": "Featherstonehaugh-FORM"}], kwargs={},
        fingerprint="c" * 40,
        headers={"headers": {"recovery_saga": {"run": 9, "step": 1, "role": "step",
                                               "secret_keys": ["maiden_name"]}}})
    page = staff_client("replay_deadletter").get(replay_url(letter))
    assert page.status_code == 200
    text = page.content.decode()
    assert "Featherstonehaugh-FORM" not in text and "Contains secrets" in text
