"""Attack: read a task's secrets from django-celery-results' rows, as a staff user who may
only view task results, or straight from the database.

With ``result_extended`` every TaskResult row keeps the task's arguments, and a FAILURE row
the exception text and traceback; django-celery-results' own admin shows them and searches
them (``search_fields`` include ``task_args``/``task_kwargs``). Real workers run the tasks.
"""

from __future__ import annotations

import json

import pytest
from celery import current_app, states
from celery.app.task import Context
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse
from django_celery_results.models import TaskResult

from recovery.store import deferred, result_rows
from recovery.models import DeadLetter
from recovery.store.parking import drain_spool
from recovery.operations.replay import replay

from ..integration.conftest import key, start_worker, store, worker_env  # noqa: F401
from ..integration.harness import wait_for
from . import result_tasks as rt
from .result_tasks import API_KEY, CARD_TOKEN

pytestmark = pytest.mark.integration

SECRETS = (CARD_TOKEN, API_KEY)
INCLUDE = ("-I", "tests.integration.worker_tasks,tests.security.result_tasks")


def result_viewer(client):
    """A staff user with only ``django_celery_results.view_taskresult``."""
    user = get_user_model().objects.create_user("results-viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(
        codename="view_taskresult", content_type__app_label="django_celery_results"))
    client.force_login(user)
    return client


def stored_row(task_id: str, status: str) -> TaskResult:
    return wait_for(lambda: TaskResult.objects.filter(task_id=task_id, status=status).first(),
                    30, message=f"{status} row of {task_id}")


def assert_no_secret_anywhere(client, row: TaskResult) -> None:
    """Neither the row's columns, nor the admin's change page, nor its search find a secret."""
    row.refresh_from_db()
    for column in ("task_args", "task_kwargs", "result", "traceback", "meta"):
        text = str(getattr(row, column) or "")
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {column}: {text[:500]}"
    page = client.get(reverse("admin:django_celery_results_taskresult_change", args=[row.pk]))
    assert page.status_code == 200
    for secret in SECRETS:
        assert secret not in page.content.decode()
        found = client.get(reverse("admin:django_celery_results_taskresult_changelist"),
                           {"q": secret})
        assert found.status_code == 200
        assert row.task_id not in found.content.decode(), f"searching {secret} finds the row"


def park_on_a_worker(start_worker, client, order: str, outcome: str):
    """(a results viewer, the letter, its FAILURE row) of ``charge`` failing for good."""
    start_worker(extra=INCLUDE)
    viewer = result_viewer(client)
    result = rt.charge.delay(order, CARD_TOKEN, api_key=API_KEY, outcome=outcome)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="dead letter")
    return viewer, letter, stored_row(result.id, states.FAILURE)


def test_a_successful_tasks_row_holds_its_arguments_masked(start_worker, client):
    # Given a worker, and a task called with a secret positionally and as a keyword,
    # published by RecoveryTask.delay and by a plain send_task (no masked repr)
    start_worker(extra=INCLUDE)
    viewer = result_viewer(client)
    delayed = rt.charge.delay("o-1", CARD_TOKEN, api_key=API_KEY)
    sent = current_app.send_task(rt.charge.name, args=["o-2", CARD_TOKEN],
                                 kwargs={"api_key": API_KEY})
    # When both succeed
    assert delayed.get(timeout=30) == "charged o-1"
    assert sent.get(timeout=30) == "charged o-2"
    # Then neither row, its page nor a search reveals the secrets, and the rest is shown
    for result in (delayed, sent):
        row = stored_row(result.id, states.SUCCESS)
        assert_no_secret_anywhere(viewer, row)
        assert "o-" in row.task_args and "api_key" in row.task_kwargs


def test_a_parked_tasks_failure_row_is_masked_and_its_letter_keeps_the_payload(
        start_worker, client):
    # Given a worker and a task declined for good (parked on the fast path)
    viewer, letter, row = park_on_a_worker(start_worker, client, "o-3", "declined")
    # Then its FAILURE row holds no secret, and the letter the real payload (for replay)
    assert_no_secret_anywhere(viewer, row)
    assert "card declined for order o-3" in row.result
    assert letter.args == ["o-3", CARD_TOKEN]
    assert letter.kwargs == {"api_key": API_KEY, "outcome": "declined"}


def test_an_exception_quoting_secrets_is_scrubbed_from_the_row_on_both_park_paths(
        start_worker, client):
    # Given a worker and a task whose exception quotes its secrets
    viewer, letter, row = park_on_a_worker(start_worker, client, "o-4", "quoted")
    # Then the FAILURE row (fast path) has the message and traceback without them
    assert_no_secret_anywhere(viewer, row)
    assert "declined for key" in row.result and "DependencyError" in row.traceback
    # When an operator replays it and it fails again (a second park: the general path)
    replay(letter, actor="op")
    wait_for(lambda: DeadLetter.objects.filter(pk=letter.pk, status=DeadLetter.Status.PARKED,
                                               replay_count=1).exists(), 30,
             message="the replay parked again")
    # Then its new FAILURE row is scrubbed too, and the letter still holds the real payload
    row = stored_row(letter.task_id, states.FAILURE)
    assert_no_secret_anywhere(viewer, row)
    letter.refresh_from_db()
    assert letter.args == ["o-4", CARD_TOKEN]
    assert letter.kwargs["api_key"] == API_KEY


def test_a_deferred_success_result_is_spooled_and_stored_masked(transactional_db, client):
    # Given a SUCCESS result whose store failed, spooled with the request it ran under
    # (a request without Celery's argsrepr: its raw arguments are all there is)
    request = Context(task=rt.charge.name, args=["o-5", CARD_TOKEN],
                      kwargs={"api_key": API_KEY}, hostname="w1@host")
    path = deferred.defer_result(current_app.backend, "deferred-1", "charged o-5", request)
    # Then the spool file holds no secret
    spooled = path.read_text()
    for secret in SECRETS:
        assert secret not in spooled
    # When the spool is drained
    drain_spool(backend=current_app.backend)
    # Then the stored row holds the arguments masked
    row = TaskResult.objects.get(task_id="deferred-1")
    assert row.status == states.SUCCESS and json.loads(row.result) == "charged o-5"
    assert "o-5" in row.task_args
    assert_no_secret_anywhere(result_viewer(client), row)


class Hostile:
    """An argument whose comparison raises: masking it fails."""

    def __eq__(self, other):
        raise RuntimeError("no comparing me")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Hostile({CARD_TOKEN})"


def test_arguments_that_cannot_be_masked_are_hidden_whole_and_never_stop_the_task():
    # Given arguments the masking rules fail on
    args, kwargs = ["o-6", Hostile()], {"api_key": API_KEY}
    # When their reprs are masked, and the values to scrub are collected
    reprs = result_rows.masked_reprs(rt.charge.name, args, kwargs)
    request = Context(task=rt.charge.name, args=args, kwargs=kwargs)
    values = result_rows.hidden_in_request(request)
    shown_exc, shown_tb = result_rows.scrubbed_failure(
        current_app.backend, ValueError(f"bad {CARD_TOKEN}"), f"Traceback: {CARD_TOKEN}", values)
    # Then no repr shows them, and the failure text is hidden whole
    assert reprs == (result_rows.UNMASKABLE, result_rows.UNMASKABLE)
    assert CARD_TOKEN not in str(shown_exc) and CARD_TOKEN not in shown_tb
    assert shown_exc["exc_type"] == "ValueError"


def test_a_success_result_spooled_before_masking_is_stored_masked(transactional_db, client):
    # Given a deferred SUCCESS record spooled by an older release: raw arguments, no reprs
    payload = json.dumps("charged o-7")
    deferred.defer(deferred.RESULT, task_id="deferred-2", state=states.SUCCESS,
                   content_type="application/json", content_encoding="utf-8", payload=payload,
                   request={"task": rt.charge.name, "args": ["o-7", CARD_TOKEN],
                            "kwargs": {"api_key": API_KEY}, "hostname": "w1@host"})
    # When the spool is drained
    drain_spool(backend=current_app.backend)
    # Then the row holds the arguments masked
    row = TaskResult.objects.get(task_id="deferred-2")
    assert row.status == states.SUCCESS and "o-7" in row.task_args
    assert_no_secret_anywhere(result_viewer(client), row)
