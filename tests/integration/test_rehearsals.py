"""Failure rehearsals on real worker processes (issue 15): a rehearsal started from the
command hits every run of one task, its letters and its one incident carry its tag, the
ticket is sent, stopping it reaches the worker within a second or two, replaying a letter
resolves it, and the report says all of this, letter by letter. A rehearsal that kills
the pool child is parked by the worker's main process, tagged all the same."""

from __future__ import annotations

import json
import time
from io import StringIO

import pytest
from django.core.management import call_command

from recovery.models import DeadLetter, Incident, IncidentNotification, Rehearsal
from recovery.operations import rehearsal_report
from recovery.operations.replay import replay

from . import worker_tasks as t
from .harness import wait_for
from .test_escalation import escalation_env
from ..brokers import broker_independent

pytestmark = [pytest.mark.integration, broker_independent]  # a webhook ticket

MATCHING = "tests.integration.worker_tasks.add_one"


@pytest.fixture
def rehearsals_on(settings):
    from recovery.workflows import rehearsals

    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": True}
    yield
    rehearsals.stop(None, actor="test")


def rehearse(*args) -> str:
    out = StringIO()
    call_command("rehearse", *args, stdout=out)
    return out.getvalue()


def test_a_rehearsal_tags_its_letters_opens_one_incident_and_its_report_matches(
        start_worker, receiver, key, rehearsals_on):
    # Given a worker that takes rehearsals and opens an incident at 3 letters of a failure
    start_worker(env={**escalation_env(receiver), "RECOVERY_TEST_REHEARSALS": "1"})
    # When a rehearsal injects a permanent dependency failure into every run of one task
    out = rehearse("start", "--task", MATCHING, "--fault", "permanent", "--rate", "1",
                   "--for", "5m", "--message", "payments gateway down")
    rehearsal = Rehearsal.objects.get()
    assert f"rehearsal {rehearsal.pk} started" in out
    hit = [t.add_one.delay(n) for n in range(5)]
    spared = [t.remember.delay(n, key) for n in range(3)]

    # Then each hit run is parked at once (permanent: no retry), tagged with the rehearsal
    wait_for(lambda: DeadLetter.objects.filter(rehearsal=str(rehearsal.pk)).count() == 5, 30,
             message="5 letters tagged with the rehearsal")
    letters = DeadLetter.objects.filter(rehearsal=str(rehearsal.pk))
    assert {letter.task_id for letter in letters} == {r.id for r in hit}
    for letter in letters:
        assert letter.kind == "dependency" and letter.permanent
        assert letter.exception_type == "recovery.errors.RehearsalFault"
        assert letter.exception_message == (f"rehearsal {rehearsal.pk}: injected permanent "
                                            f"failure: payments gateway down")
        assert letter.attempts == 1
    # and the other task ran as usual
    assert [r.get(timeout=20) for r in spared] == [0, 1, 2]
    assert not DeadLetter.objects.filter(task_id__in=[r.id for r in spared]).exists()
    # and one incident collects the letters, tagged, its ticket sent once
    incident = wait_for(lambda: Incident.objects.filter(count=5).first(), 15,
                        message="the incident to collect the 5 letters")
    assert Incident.objects.count() == 1
    assert incident.rehearsal == str(rehearsal.pk)
    assert incident.title.startswith(f"[rehearsal {rehearsal.pk}] ")
    wait_for(lambda: IncidentNotification.objects.filter(status="sent").exists(), 20,
             message="the ticket to be delivered")
    ticket = json.loads(receiver.received()[-1]["body"])
    assert ticket["incident"]["title"].startswith(f"[rehearsal {rehearsal.pk}] ")

    # When the rehearsal is stopped
    assert "stopped" in rehearse("stop", str(rehearsal.pk))
    # Then the worker stops injecting once its view is a read interval (one second) old
    time.sleep(1.5)
    assert t.add_one.delay(41).get(timeout=20) == 42
    # and a replayed letter resolves
    replayed = replay(letters.order_by("id").first(), actor="tester")
    wait_for(lambda: DeadLetter.objects.get(pk=replayed.pk).status == "resolved", 20,
             message="the replayed letter to resolve")

    # And the report follows every hit run to its letter, incident, channel and replay
    found = rehearsal_report.report(Rehearsal.objects.get(pk=rehearsal.pk))
    assert {task.task_id for task in found.tasks} == {r.id for r in hit}
    assert {task.letter_id for task in found.tasks} == set(letters.values_list("id", flat=True))
    assert found.untracked_letters == []
    assert found.counts() == {"parked": 4, "resolved": 1}
    for task in found.tasks:
        assert task.hits == 1 and task.retries == 0
        assert [i["id"] for i in task.incidents] == [incident.pk]
        assert task.incidents[0]["channels"] == ["webhook (sent)"]
        assert task.to_park is not None and task.to_park < 30
    resolved = next(task for task in found.tasks if task.outcome == "resolved")
    assert resolved.letter_id == replayed.pk and resolved.to_replay is not None
    assert resolved.to_resolve is not None
    printed = rehearse("report", str(rehearsal.pk))
    assert "5 runs hit in 5 tasks: 4 parked, 1 resolved" in printed
    assert f"Incident #{incident.pk} (open), notified: webhook (sent)" in printed

    # And purging removes what the rehearsal left, and only that
    assert "deleted 5 letters and 1 incidents" in rehearse("purge", str(rehearsal.pk))
    assert not DeadLetter.objects.filter(task_id__in=[r.id for r in hit]).exists()
    assert not Incident.objects.exists()


def test_a_killed_child_is_parked_by_the_main_process_with_the_rehearsals_tag(
        start_worker, rehearsals_on):
    # Given a worker that takes rehearsals, and a rehearsal that kills every run of a task
    start_worker(env={"RECOVERY_TEST_REHEARSALS": "1"}, concurrency=1)
    rehearse("start", "--task", MATCHING, "--fault", "kill", "--rate", "1", "--for", "5m")
    rehearsal = Rehearsal.objects.get()
    # When a run is sent: each delivery kills the pool child, until the delivery cap
    result = t.add_one.delay(1)
    # Then the worker's main process parks it, with the tag its child never wrote
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 60,
                      message="the letter of the killed task")
    assert letter.rehearsal == str(rehearsal.pk)
    found = rehearsal_report.report(rehearsal)
    assert [(task.task_id, task.letter_id) for task in found.tasks] == [(result.id, letter.pk)]
    assert found.tasks[0].hits >= 2
