"""Failure rehearsals: starting and refusing, what workers read and how often, what is
injected into which runs, the tag a letter keeps, the command's bad inputs, the checks."""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from celery import shared_task
from django.core.checks import run_checks
from django.core.management import CommandError, call_command
from django.utils import timezone

from recovery import RecoveryTask
from recovery.core import headers as hdr
from recovery.core.classification import classify
from recovery.core.kinds import FailureKind
from recovery.models import DeadLetter, Incident, Rehearsal, RehearsalEvent, RehearsalInjection
from recovery.operations import rehearsal_report
from recovery.store.parking import ParkRecord, park
from recovery.workflows import rehearsals, shared_state

pytestmark = pytest.mark.django_db(transaction=True)


@shared_task(base=RecoveryTask, bind=True, name="tests.rehearsals.charge")
def charge(self, amount: int) -> int:
    return amount


@shared_task(base=RecoveryTask, bind=True, name="tests.rehearsals.refund")
def refund(self, amount: int) -> int:
    return -amount


@pytest.fixture
def enabled(settings, monkeypatch):
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": True}
    rehearsals._cache.clear()
    yield
    monkeypatch.undo()  # a test's fake store goes before the clean-up
    rehearsals.stop(None, actor="test")
    rehearsals._cache.clear()


def start(**options):
    values = dict(task="tests.rehearsals.charge", fault="permanent", rate=1.0,
                  duration=timedelta(minutes=5), actor="cli:tester")
    return rehearsals.start(**{**values, **options})


def run_request(task_id: str = "t-1"):
    return SimpleNamespace(id=task_id)


# -- starting ------------------------------------------------------------------------------------


def test_nothing_starts_unless_rehearsals_are_enabled(settings):
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": False}
    with pytest.raises(rehearsals.RehearsalsDisabled, match="REHEARSALS_ENABLED"):
        start()
    assert not Rehearsal.objects.exists()


@pytest.mark.parametrize("options, message", [
    ({"fault": "explode"}, "--fault must be one of"),
    ({"rate": 0}, r"--rate must be in \(0, 1\]"),
    ({"rate": 1.5}, r"--rate must be in \(0, 1\]"),
    ({"rate": "often"}, "--rate must be a number"),
    ({"duration": timedelta(0)}, "positive time"),
    ({"duration": timedelta(hours=24, seconds=1)}, "24 hours at most"),
    ({"kind": "poison"}, "--kind must be one of"),
    ({"message": "x" * 256}, "255 characters"),
    ({"task": ""}, "1 to 255 characters"),
    ({"task": "tests.rehearsals.chrage"}, "matches no registered task; did you mean "
                                          "tests.rehearsals.charge"),
])
def test_a_bad_request_is_refused_with_its_reason_and_starts_nothing(enabled, options, message):
    with pytest.raises(ValueError, match=message):
        start(**options)
    assert not Rehearsal.objects.exists()


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("2h", 7200), ("90", 90),
                                           ("1.5m", 90), ("24h", 86400)])
def test_durations_read_as_operators_write_them(text, seconds):
    assert rehearsals.parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "ten minutes", "25h", "0s", "-5m"])
def test_a_duration_that_is_not_one_or_too_long_is_refused(text):
    with pytest.raises(ValueError):
        rehearsals.parse_duration(text)


def test_starting_and_stopping_are_audit_events_and_reach_the_shared_store(enabled):
    rehearsal = start(message="card processor down")
    assert [e.action for e in rehearsal.events.all()] == ["started"]
    assert rehearsal.events.get().actor == "cli:tester"
    published = shared_state.store().get(rehearsals.STORE_KEY)["rehearsals"]
    assert [item["id"] for item in published] == [rehearsal.pk]
    assert rehearsals.active()[0].message == "card processor down"

    assert [r.pk for r in rehearsals.stop([rehearsal.pk], actor="cli:other")] == [rehearsal.pk]
    rehearsal.refresh_from_db()
    assert rehearsal.stopped_by == "cli:other" and not rehearsal.is_running()
    assert sorted(e.action for e in rehearsal.events.all()) == ["started", "stopped"]
    assert shared_state.store().get(rehearsals.STORE_KEY)["rehearsals"] == []
    assert rehearsals.active() == ()
    # Stopping again changes nothing and writes no second event
    assert rehearsals.stop([rehearsal.pk], actor="cli:other") == []
    assert rehearsal.events.count() == 2


# -- what workers read ---------------------------------------------------------------------------


def test_a_worker_reads_the_store_at_most_once_a_second_however_many_tasks_run(enabled, monkeypatch):
    start()
    rehearsals._cache.clear()
    reads = []
    real = shared_state.store()

    class Counting:
        def get(self, key):
            reads.append(key)
            return real.get(key)

    monkeypatch.setattr(shared_state, "store", lambda: Counting())
    for _ in range(2000):
        assert len(rehearsals.active()) == 1
    assert len(reads) == 1
    time.sleep(rehearsals.READ_INTERVAL_SECONDS + 0.05)
    rehearsals.active()
    assert len(reads) == 2


def test_a_rehearsal_expires_on_workers_by_itself_without_being_told(enabled):
    rehearsal = start()
    # the store still holds it, with an expiry already past
    Rehearsal.objects.filter(pk=rehearsal.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    stale = rehearsals.ActiveRehearsal.of(Rehearsal.objects.get(pk=rehearsal.pk)).to_dict()
    shared_state.store().update(rehearsals.STORE_KEY,
                                lambda record: record.update(rehearsals=[stale]))
    rehearsals._cache.clear()
    assert rehearsals.active() == ()
    assert not Rehearsal.objects.get(pk=rehearsal.pk).is_running()


def test_a_store_that_cannot_be_read_injects_nothing_and_fails_no_task(enabled, monkeypatch, caplog):
    start()
    rehearsals._cache.clear()

    class Broken:
        def get(self, key):
            raise ConnectionError("store down")

    monkeypatch.setattr(shared_state, "store", lambda: Broken())
    assert rehearsals.active() == ()
    rehearsals.inject(charge, run_request())  # returns: nothing injected
    assert "injecting nothing until the store answers" in caplog.text


def test_with_rehearsals_disabled_a_worker_never_reads_the_store(settings, monkeypatch):
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": False}
    monkeypatch.setattr(shared_state, "store", lambda: pytest.fail("read the store"))
    assert rehearsals.active() == ()


# -- what is injected ----------------------------------------------------------------------------


def test_a_permanent_fault_hits_matching_runs_only_and_tags_and_records_the_run(enabled):
    rehearsal = start(kind="resource_exhausted", message="disk full")
    request = run_request("t-perm")
    with pytest.raises(rehearsals.RehearsalFault) as raised:
        rehearsals.inject(charge, request)
    failure = classify(raised.value)
    assert (failure.kind, failure.permanent) == (FailureKind.RESOURCE_EXHAUSTED, True)
    assert str(raised.value) == f"rehearsal {rehearsal.pk}: injected permanent failure: disk full"
    assert getattr(request, hdr.REHEARSAL) == str(rehearsal.pk)
    injection = RehearsalInjection.objects.get()
    assert (injection.rehearsal_id, injection.task_id, injection.fault) == (
        rehearsal.pk, "t-perm", "permanent")
    # another task is not touched
    untouched = run_request("t-other")
    rehearsals.inject(refund, untouched)
    assert not hasattr(untouched, hdr.REHEARSAL)
    assert rehearsals.injected_into("t-perm") == str(rehearsal.pk)
    assert rehearsals.injected_into("t-other") == ""


def test_a_pattern_matches_every_task_it_names(enabled):
    start(task="tests.rehearsals.*", fault="transient")
    for task in (charge, refund):
        with pytest.raises(rehearsals.RehearsalFault) as raised:
            rehearsals.inject(task, run_request())
        assert classify(raised.value).permanent is False


def test_the_rate_is_the_share_of_runs_hit(enabled):
    start(rate=0.25, fault="transient")
    hit = 0
    for n in range(2000):
        try:
            rehearsals.inject(charge, run_request(f"t-{n}"))
        except rehearsals.RehearsalFault:
            hit += 1
    assert 380 < hit < 620  # 500 expected; 5+ standard deviations either side


def test_a_timeout_fault_is_celerys_soft_time_limit_and_classified_as_a_timeout(enabled):
    start(fault="timeout")
    with pytest.raises(rehearsals.RehearsedTimeLimit) as raised:
        rehearsals.inject(charge, run_request())
    assert classify(raised.value).kind == FailureKind.TIMEOUT


def test_a_hang_lasts_until_the_rehearsal_stops_then_the_body_runs(enabled):
    rehearsal = start(fault="hang")
    import threading

    threading.Timer(1.0, lambda: rehearsals.stop([rehearsal.pk], actor="test")).start()
    began = time.monotonic()
    rehearsals.inject(charge, run_request())  # returns once the rehearsal ended
    assert 0.9 < time.monotonic() - began < 4


def test_the_injected_error_crosses_processes_with_its_kind():
    fault = rehearsals.RehearsalFault("rehearsal 3: injected", kind="timeout", permanent=True)
    copy = pickle.loads(pickle.dumps(fault))
    assert (copy.kind, copy.permanent, str(copy)) == (FailureKind.TIMEOUT, True, str(fault))


def test_a_task_run_by_recovery_task_is_hit_before_its_body(enabled):
    start()
    # Eager runs are called directly by nobody's worker: the lifecycle still applies
    result = charge.apply(args=(5,))
    assert result.failed()
    assert isinstance(result.result, rehearsals.RehearsalFault)


# -- the letter's tag ----------------------------------------------------------------------------


def test_a_letter_keeps_its_rehearsal_when_a_replay_of_it_fails_again_untagged():
    tagged = ParkRecord(task_id="rh-1", task_name="tests.rehearsals.charge", kind="dependency",
                        reason="injected", history=[{"attempt": 1, "replay": 0}], rehearsal="7")
    park(tagged)
    assert DeadLetter.objects.get(task_id="rh-1").rehearsal == "7"
    again = ParkRecord(task_id="rh-1", task_name="tests.rehearsals.charge", kind="dependency",
                       reason="real", history=[{"attempt": 1, "replay": 1}], replay=1)
    park(again)
    assert DeadLetter.objects.get(task_id="rh-1").rehearsal == "7"


# -- the command ---------------------------------------------------------------------------------


def command(*args, name: str = "rehearse") -> str:
    from io import StringIO

    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


def test_the_command_starts_lists_stops_reports_and_purges(enabled):
    out = command("start", "--task", "tests.rehearsals.charge", "--fault", "permanent",
                  "--rate", "1", "--for", "10m", "--message", "gateway down")
    rehearsal = Rehearsal.objects.get()
    assert f"rehearsal {rehearsal.pk} started" in out
    assert rehearsal.started_by.startswith("cli")
    assert str(rehearsal.pk) in command("list")
    with pytest.raises(CommandError, match="still running"):
        command("purge", str(rehearsal.pk))
    assert "stopped" in command("stop", str(rehearsal.pk))
    assert command("list") == "no rehearsal is running\n"
    assert str(rehearsal.pk) in command("list", "--all")
    assert "No run was hit" in command("report", str(rehearsal.pk))
    assert "deleted 0 letters and 0 incidents" in command("purge", str(rehearsal.pk))
    assert sorted(e.action for e in RehearsalEvent.objects.all()) == ["purged", "started", "stopped"]


@pytest.mark.parametrize("args, message", [
    (("start", "--task", "tests.rehearsals.charge", "--fault", "permanent", "--rate", "1"),
     "--for"),
    (("start", "--task", "tests.rehearsals.charge", "--fault", "permanent", "--rate", "1",
      "--for", "2d"), "not a duration"),
    (("start", "--task", "tests.rehearsals.charge", "--fault", "melt", "--rate", "1",
      "--for", "1m"), "invalid choice"),
    (("stop",), "name the rehearsals to stop, or --all"),
    (("stop", "999999"), "no such rehearsal: 999999"),
    (("report", "999999"), "rehearsal 999999 does not exist"),
    (("purge", "999999"), "rehearsal 999999 does not exist"),
])
def test_the_command_refuses_a_bad_request_with_its_reason(enabled, args, message):
    with pytest.raises(CommandError, match=message):
        command(*args)
    assert not Rehearsal.objects.exists()


def test_the_command_says_rehearsals_are_off(settings):
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": False}
    with pytest.raises(CommandError, match="rehearsals are off here"):
        command("start", "--task", "tests.rehearsals.charge", "--fault", "permanent",
                "--rate", "1", "--for", "1m")


def test_purge_deletes_the_rehearsals_letters_and_incidents_and_nothing_else(enabled):
    rehearsal = start()
    rehearsals.stop([rehearsal.pk], actor="test")
    park(ParkRecord(task_id="rh-a", task_name="x", kind="dependency", reason="r",
                    rehearsal=str(rehearsal.pk)))
    park(ParkRecord(task_id="real", task_name="x", kind="dependency", reason="r"))
    Incident.objects.create(fingerprint="f1", reason="threshold", title="t",
                            rehearsal=str(rehearsal.pk))
    Incident.objects.create(fingerprint="f2", reason="threshold", title="real")
    listed = command("list", "--rehearsal", str(rehearsal.pk), name="dlq").splitlines()[1:]
    assert [int(row.split()[0]) for row in listed] == [DeadLetter.objects.get(task_id="rh-a").pk]
    assert rehearsal_report.purge(rehearsal, actor="cli:x") == {"letters": 1, "incidents": 1}
    assert list(DeadLetter.objects.values_list("task_id", flat=True)) == ["real"]
    assert list(Incident.objects.values_list("title", flat=True)) == ["real"]


# -- the checks ----------------------------------------------------------------------------------


def test_a_check_warns_when_rehearsals_are_on_without_debug(settings):
    settings.DEBUG = False
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": True}
    assert "recovery.W050" in {m.id for m in run_checks()}
    settings.DEBUG = True
    assert "recovery.W050" not in {m.id for m in run_checks()}
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": "yes"}
    assert "recovery.E050" in {m.id for m in run_checks()}
