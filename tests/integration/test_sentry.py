"""Sentry from a real prefork worker with sentry-sdk's Celery integration on: a task that
retries and is parked is one Sentry event, ours, and retries are none."""

from __future__ import annotations

import json
import time

import pytest
from celery import states

from recovery.core.fingerprint import fingerprint
from recovery.models import DeadLetter
from recovery.core.redaction import MASK

from ..recovery.test_sentry import SentryStandIn
from . import sentry_tasks as s
from .harness import wait_for

pytestmark = pytest.mark.integration

CARD_TOKEN = "tok_live_9911WORKERsecret"
TASK = "tests.integration.sentry_tasks.charge_card"


@pytest.fixture
def stand_in():
    server = SentryStandIn()
    yield server
    server.close()


def events_of(stand_in, task_id: str) -> list[dict]:
    """Events about ``task_id``: ours (dead_letter context) or the Celery integration's
    (its celery_task_id tag)."""
    return [e for e in stand_in.events()
            if (e.get("contexts", {}).get("dead_letter") or {}).get("task_id") == task_id
            or (e.get("tags") or {}).get("celery_task_id") == task_id]


def test_a_task_that_retries_then_is_parked_is_one_sentry_event(start_worker, store, key,
                                                                  stand_in):
    # Given a worker reporting to Sentry with the Celery integration, and admin links
    start_worker(env={
        "RECOVERY_TEST_SENTRY_DSN": stand_in.dsn,
        "RECOVERY_TEST_ESCALATION": json.dumps({"ADMIN_BASE_URL": "https://ops.example.com"}),
    }, extra=("-I", "tests.integration.worker_tasks,tests.integration.sentry_tasks"))

    # When one charge fails transiently twice then for good, and another fails
    # transiently twice then succeeds
    parked = s.charge_card.delay(f"{key}-p", CARD_TOKEN, "9.99", fail_for_good=True)
    healed = s.charge_card.delay(f"{key}-h", CARD_TOKEN, "5.00", fail_for_good=False)
    assert healed.get(timeout=30) == "charged 5.00"
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=parked.id).first(), 30,
                      message="dead letter")
    wait_for(lambda: parked.state == states.FAILURE, 10, message="FAILURE result")

    # Then Sentry receives exactly one event for the parked task, and it is ours ...
    wait_for(lambda: events_of(stand_in, parked.id), 15, message="the Sentry event")
    time.sleep(3)  # a second event (the integration's, or a retry's) would arrive by now
    found = events_of(stand_in, parked.id)
    assert len(found) == 1, json.dumps(found, indent=1)[:4000]
    [event] = found
    assert "dead_letter" in event["contexts"]
    # ... none for the task that healed (its retries were not errors), nor any other
    assert events_of(stand_in, healed.id) == []
    assert len(stand_in.events()) == 1, [e.get("exception") or e.get("logentry")
                                         for e in stand_in.events()]
    # ... grouped by the letter's fingerprint, tagged, with the real frames of the task
    assert event["fingerprint"] == ["celery-recovery", letter.fingerprint]
    assert letter.fingerprint == fingerprint(TASK, "recovery.errors.DependencyError",
                                             "card declined for amount 9.99")
    assert {k: event["tags"].get(k) for k in ("recovery.task", "recovery.kind", "recovery.queue",
                                             "recovery.status", "recovery.permanent")} == {
        "recovery.task": TASK, "recovery.kind": "dependency", "recovery.queue": "celery",
        "recovery.status": "parked", "recovery.permanent": "true",
    }
    assert event["level"] == "error"
    [value] = event["exception"]["values"]
    assert value["value"] == "card declined for amount 9.99"
    assert value["stacktrace"]["frames"][-1]["function"] == "charge_card"
    # ... with the attempt history, masked arguments and a link to the letter
    context = event["contexts"]["dead_letter"]
    assert context["attempts"] == 3
    assert [h["kind"] for h in context["history"]] == ["dependency"] * 3
    assert context["args"] == [f"{key}-p", MASK, "9.99"]
    assert context["letter_id"] == letter.pk
    assert context["links"]["letter"] == (
        f"https://ops.example.com/admin/recovery/deadletter/{letter.pk}/change/")
    # ... and the card token is nowhere in what reached Sentry (frame locals included)
    assert CARD_TOKEN.encode() not in stand_in.raw()
