"""recovery.observe.watchdog on the real PostgreSQL test database: each check, what it recovers,
what it escalates, what it leaves alone, and its settings.

No worker runs here: what the workers hold is a small stand-in (``Held``) passed to
``sweep(workers=...)``, and its ``active()`` replies have the shape of Celery 5.7's
``Request.info()``. The real broadcast, worker and beat are in
``tests/integration/test_watchdog.py``.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from io import StringIO

import pytest
from celery import Celery
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.utils import timezone

from recovery.workflows import sagas
from recovery.observe import watchdog
from recovery.checks import check_recovery_settings
from recovery.models import (
    DeadLetter,
    DeadLetterEvent,
    DueRetry,
    Incident,
    OutboxMessage,
    SagaEvent,
    SagaRun,
    SagaStep,
)
from recovery.core.redaction import MASK
from recovery.workflows.sagas import Saga, SagaDefinitionError, Step
from recovery.observe.watchdog import Report, WatchdogPolicy
from tests.integration import watchdog_tasks

pytestmark = pytest.mark.django_db

HANG = watchdog_tasks.hang.name
ONE, TWO = watchdog_tasks.lost_step_one.name, watchdog_tasks.lost_step_two.name


class Held:
    """What the workers hold, as ``sweep`` asks it: ``active`` replies per worker, and the
    ids some worker runs, prefetched or holds until a retry's ETA."""

    def __init__(self, active=None, holding=(), broken: bool = False) -> None:
        self._active = active or {}
        self._holding = set(holding)
        self.broken = broken
        self.asked: list[set] = []

    def active(self):
        if self.broken:
            raise ConnectionError("broker unreachable")
        return self._active

    def holding(self, task_ids):
        if self.broken:
            raise ConnectionError("broker unreachable")
        self.asked.append(set(task_ids))
        return self._holding & set(task_ids)


@pytest.fixture
def watchdog_settings(settings):
    def apply(**values):
        settings.RECOVERY = {**settings.RECOVERY, "WATCHDOG": values}

    return apply


def later(seconds: float):
    return timezone.now() + timedelta(seconds=seconds)


def info(task_id: str, name: str = HANG, *, started: float, worker: str = "w1@host",
         args=None, kwargs=None) -> dict:
    """One entry of ``inspect().active()`` as a Celery 5.7 worker sends it."""
    return {"id": task_id, "name": name, "args": args if args is not None else ["k"],
            "kwargs": kwargs if kwargs is not None else {}, "type": name, "hostname": worker,
            "time_start": started, "acknowledged": False, "worker_pid": 4242,
            "delivery_info": {"exchange": "", "routing_key": "celery", "priority": 0,
                              "redelivered": False}}


# -- settings -------------------------------------------------------------------------------


def test_the_policy_merges_the_settings_over_the_defaults():
    assert WatchdogPolicy.from_dict(None) == WatchdogPolicy()
    chosen = WatchdogPolicy.from_dict({"INTERVAL_SECONDS": 5, "OUTBOX_AFTER_SECONDS": None})
    assert chosen.interval_seconds == 5.0
    assert chosen.outbox_after_seconds is None
    assert chosen.task_deadline_seconds == 3600.0
    assert chosen.saga_step_max_redispatches == 3
    assert chosen.inspect_timeout_seconds == 1.0
    assert WatchdogPolicy.from_dict({"INSPECT_TIMEOUT_SECONDS": 3}).inspect_timeout_seconds == 3.0


@pytest.mark.parametrize("values, message", [
    ({"INTERVAL": 5}, "unknown RECOVERY['WATCHDOG'] keys: INTERVAL; known: "
                      "INSPECT_TIMEOUT_SECONDS, INTERVAL_SECONDS"),
    ({"INSPECT_TIMEOUT_SECONDS": None}, "INSPECT_TIMEOUT_SECONDS must be a positive number "
                                        "of seconds, not None"),
    ({"TASK_DEADLINE_SECONDS": 0}, "TASK_DEADLINE_SECONDS must be a positive number of seconds, "
                                   "or None to turn it off, not 0"),
    ({"REPLAYING_AFTER_SECONDS": "15m"}, "REPLAYING_AFTER_SECONDS must be a positive number"),
    ({"OUTBOX_AFTER_SECONDS": True}, "OUTBOX_AFTER_SECONDS must be a positive number"),
    ({"SAGA_STEP_MAX_REDISPATCHES": -1}, "SAGA_STEP_MAX_REDISPATCHES must be an integer >= 0"),
    ({"SAGA_STEP_MAX_REDISPATCHES": 2.5}, "SAGA_STEP_MAX_REDISPATCHES must be an integer >= 0"),
])
def test_a_bad_watchdog_setting_is_refused_with_a_plain_message(values, message):
    with pytest.raises(ValueError) as raised:
        WatchdogPolicy.from_dict(values)
    assert message in str(raised.value)


def test_a_bad_watchdog_setting_fails_the_system_check(watchdog_settings):
    watchdog_settings(SAGA_STEP_TIMEOUT_SECONDS=-5)
    (problem,) = check_recovery_settings()
    assert problem.id == "recovery.E016"
    assert "SAGA_STEP_TIMEOUT_SECONDS must be a positive number" in problem.msg
    watchdog_settings(SAGA_STEP_TIMEOUT_SECONDS=60, OUTBOX_AFTER_SECONDS=None)
    assert check_recovery_settings() == []


def test_an_invalid_setting_runs_no_check(watchdog_settings):
    watchdog_settings(INTERVAL_SECONDS=-1)
    report = watchdog.sweep(workers=Held(broken=True))
    assert report.failed_checks == ("settings",)
    assert report.found == 0


def test_setup_adds_the_beat_entry_without_replacing_the_projects_own(watchdog_settings):
    import recovery

    watchdog_settings(INTERVAL_SECONDS=20)
    app = recovery.setup(Celery("plain", set_as_current=False))
    entry = app.conf.beat_schedule["recovery-watchdog"]
    assert entry == {"task": "recovery.watchdog", "schedule": 20.0, "options": {"expires": 20.0}}
    assert "recovery.observe.watchdog" in app.conf.include

    mine = {"task": "recovery.watchdog", "schedule": 300.0, "options": {"queue": "ops"}}
    app = Celery("own", set_as_current=False)
    app.conf.beat_schedule = {"recovery-watchdog": mine, "nightly": {"task": "x", "schedule": 9}}
    recovery.setup(app)
    assert app.conf.beat_schedule["recovery-watchdog"] == mine
    assert set(app.conf.beat_schedule) == {"recovery-watchdog", "nightly"}

    watchdog_settings(INTERVAL_SECONDS=None)
    app = recovery.setup(Celery("off", set_as_current=False))
    assert "recovery-watchdog" not in (app.conf.beat_schedule or {})


def test_the_watchdog_task_is_a_plain_celery_task_even_under_task_cls():
    from celery import current_app

    from recovery.task import RecoveryTask

    project = current_app._get_current_object()
    from tests.integration import task_cls_app  # its Celery() becomes the current app

    project.set_current()  # ...which later tests must not inherit
    for app in (project, task_cls_app.app):
        task = app.tasks["recovery.watchdog"]
        assert not isinstance(task, RecoveryTask)
        assert task.ignore_result


# -- 1. stuck tasks -------------------------------------------------------------------------


def test_a_task_running_past_its_own_deadline_opens_one_incident_naming_it():
    now = time.time()
    held = Held(active={
        "w1@host": [info("t-1", started=now - 30, kwargs={"api_token": "tok_secret"}),
                    info("t-young", started=now - 1)],
        "w2@host": [info("t-2", started=now - 10, worker="w2@host"),
                    info("sweep", name="recovery.watchdog", started=now - 9999)],
    })
    report = watchdog.sweep(workers=held)
    assert report.stuck_tasks == 2
    incident = Incident.objects.get()
    assert (incident.fingerprint, incident.reason) == (f"watchdog:task:{HANG}", "stuck_task")
    assert incident.task_name == HANG
    assert incident.details["task_ids"] == ["t-1", "t-2"]  # oldest first
    assert incident.details["workers"] == ["w1@host", "w2@host"]
    first = incident.details["stuck"][0]
    assert first["deadline_seconds"] == 2.0  # hang.deadline_seconds, not the 3600 s default
    assert 29 < first["running_seconds"] < 32
    assert first["kwargs"] == {"api_token": MASK}
    assert first["queue"] == "celery" and first["worker_pid"] == 4242
    assert first["started_at_estimated"] is False
    assert "control terminate" in incident.details["to_end_one"]

    # The next sweep adds to the same incident
    watchdog.sweep(workers=held)
    assert Incident.objects.get().count == 2


def test_tasks_without_a_deadline_of_their_own_get_the_default(watchdog_settings):
    from tests.integration.worker_tasks import flaky_twice

    now = time.time()
    held = Held(active={"w1@host": [info("t-1", flaky_twice.name, started=now - 100)]})
    assert watchdog.sweep(workers=held).stuck_tasks == 0  # 100 s < 3600 s
    watchdog_settings(TASK_DEADLINE_SECONDS=60)
    assert watchdog.sweep(workers=held).stuck_tasks == 1
    assert Incident.objects.get().fingerprint == f"watchdog:task:{flaky_twice.name}"
    watchdog_settings(TASK_DEADLINE_SECONDS=None)  # the default is off
    assert watchdog.sweep(workers=held).stuck_tasks == 0


def test_a_task_whose_hard_time_limit_ends_it_first_is_left_to_celery(monkeypatch):
    monkeypatch.setattr(watchdog_tasks.hang, "time_limit", 2, raising=False)
    held = Held(active={"w1@host": [info("t-1", started=time.time() - 30)]})
    assert watchdog.sweep(workers=held).stuck_tasks == 0
    monkeypatch.setattr(watchdog_tasks.hang, "time_limit", 120, raising=False)
    assert watchdog.sweep(workers=held).stuck_tasks == 1


def test_a_start_time_that_is_not_a_unix_time_counts_from_when_a_sweep_first_saw_it(broker):
    from celery import current_app

    from recovery.observe.watchdog import stuck_tasks

    chosen = WatchdogPolicy()
    monotonic = {"w1@host": [info("t-old-celery", started=time.monotonic())]}
    assert stuck_tasks(monotonic, app=current_app, policy=chosen, now=timezone.now()) == {}
    found = stuck_tasks(monotonic, app=current_app, policy=chosen, now=later(5))
    (item,) = found[HANG]
    assert item["task_id"] == "t-old-celery"
    assert item["started_at_estimated"] is True
    assert 4 < item["running_seconds"] < 7


def test_a_dry_run_reports_stuck_tasks_but_escalates_nothing():
    held = Held(active={"w1@host": [info("t-1", started=time.time() - 30)]})
    report = watchdog.sweep(workers=held, dry_run=True)
    assert (report.stuck_tasks, report.dry_run) == (1, True)
    assert "dry run" in report.summary()
    assert not Incident.objects.exists()


# -- 2. saga steps past their timeout -------------------------------------------------------


def start(saga: Saga | None = None, **context) -> SagaRun:
    return (saga or watchdog_tasks.lost_message_saga).start(key="k", **context)


def sent(run: SagaRun) -> None:
    """The run's intents were published (what the relay does after the commit)."""
    OutboxMessage.objects.filter(task_id__startswith=f"saga-{run.pk}-").update(
        sent_at=timezone.now())


def step_row(run: SagaRun, index: int = 0, role: str = "step") -> SagaStep:
    return SagaStep.objects.get(run=run, index=index, role=role)


def test_a_step_past_its_timeout_is_dispatched_again_under_a_new_task_id():
    run = start()
    sent(run)
    first = f"saga-{run.pk}-0-step"
    assert watchdog.sweep(workers=Held(), now=later(1)).redispatched_steps == 0  # timeout 2 s
    report = watchdog.sweep(workers=Held(), now=later(3))
    assert report.redispatched_steps == 1
    row = step_row(run)
    assert (row.task_id, row.dispatches, row.status) == (f"{first}.2", 2, "running")
    intent = OutboxMessage.objects.get(task_id=f"{first}.2")
    assert intent.signature["task"] == ONE
    assert intent.signature["options"]["headers"]["recovery_saga"] == {
        "run": run.pk, "step": 0, "role": "step"}
    event = SagaEvent.objects.get(run=run)
    assert (event.action, event.actor) == ("redispatched", "watchdog")
    assert event.outcome == f"step 0 ({ONE}) dispatched again as {first}.2: {first} never finished"
    # The lost message, should it turn up after all, is stale and dropped.
    header = {"run": run.pk, "step": 0, "role": "step"}
    assert not sagas.is_current(header, first)
    assert sagas.is_current(header, f"{first}.2")
    assert not Incident.objects.exists()


def test_after_the_last_redispatch_the_step_is_escalated_instead(watchdog_settings):
    watchdog_settings(SAGA_STEP_MAX_REDISPATCHES=2)
    run = start()
    for _ in range(2):
        sent(run)
        assert watchdog.sweep(workers=Held(), now=later(3)).redispatched_steps == 1
    sent(run)
    report = watchdog.sweep(workers=Held(), now=later(3))
    assert (report.redispatched_steps, report.stuck_steps) == (0, 1)
    assert step_row(run).task_id == f"saga-{run.pk}-0-step.3"
    incident = Incident.objects.get()
    assert incident.fingerprint == "watchdog:saga_step:watchdog_lost_message:0"
    assert incident.reason == "stuck_saga_step"
    assert incident.saga_run_id == run.pk
    assert incident.details["task_ids"] == [f"saga-{run.pk}-0-step.3"]
    assert incident.details["runs"][0]["redispatches"] == 2
    assert incident.details["runs"][0]["link"] == f"/admin/recovery/sagarun/{run.pk}/change/"
    # One escalated event per stuck dispatch, however many sweeps find it
    watchdog.sweep(workers=Held(), now=later(3))
    assert SagaEvent.objects.filter(run=run, action="escalated").count() == 1
    assert Incident.objects.get().count == 2

    # Resolving the incident ("fixed, try again") gives the step its re-dispatches back
    from recovery.observe import escalation

    escalation.resolve(incident, actor="oncall")
    sent(run)
    assert watchdog.sweep(workers=Held(), now=later(3)).redispatched_steps == 1
    assert step_row(run).task_id == f"saga-{run.pk}-0-step.4"


def test_no_redispatches_allowed_escalates_at_once(watchdog_settings):
    watchdog_settings(SAGA_STEP_MAX_REDISPATCHES=0)
    run = start()
    sent(run)
    assert watchdog.sweep(workers=Held(), now=later(3)).stuck_steps == 1
    assert step_row(run).dispatches == 1


def test_a_step_a_worker_holds_a_retry_waits_for_or_was_parked_is_not_lost():
    run = start()
    sent(run)
    first = f"saga-{run.pk}-0-step"
    held = Held(holding={first})
    assert watchdog.sweep(workers=held, now=later(3)).redispatched_steps == 0
    assert held.asked == [{first}]
    retry = DueRetry.objects.create(task_id=first, task_name=ONE, due_at=later(60), signature={})
    held = Held()
    assert watchdog.sweep(workers=held, now=later(3)).redispatched_steps == 0
    assert held.asked == [set()]
    # Parked while the database was down: reconcile tells the run, it is not lost either
    retry.delete()
    DeadLetter.objects.create(task_id=first, task_name=ONE, fingerprint="f" * 40)
    assert watchdog.sweep(workers=Held(), now=later(3)).redispatched_steps == 0
    assert step_row(run).dispatches == 1


def test_a_step_whose_intent_is_still_in_the_outbox_is_not_dispatched_twice():
    run = start()  # the intent is unsent: inside the test's transaction nothing publishes
    assert OutboxMessage.objects.get(task_id=f"saga-{run.pk}-0-step").sent_at is None
    report = watchdog.sweep(workers=Held(), now=later(3))
    assert report.redispatched_steps == 0
    assert step_row(run).dispatches == 1


def test_the_steps_own_timeout_wins_and_old_snapshots_use_the_default(watchdog_settings):
    watchdog_settings(SAGA_STEP_TIMEOUT_SECONDS=100)
    own = start()  # Step(lost_step_one, timeout_seconds=2)
    plain = start(Saga("no_timeouts", steps=[Step(ONE), Step(TWO)]))
    old = start(Saga("old_snapshot", steps=[Step(ONE, timeout_seconds=50), Step(TWO)]))
    definition = old.definition
    del definition["steps"][0]["timeout_seconds"]  # written before steps had one
    SagaRun.objects.filter(pk=old.pk).update(definition=definition)
    for run in (own, plain, old):
        sent(run)
    assert watchdog.sweep(workers=Held(), now=later(60)).redispatched_steps == 1
    assert [step_row(run).dispatches for run in (own, plain, old)] == [2, 1, 1]
    for run in (own, plain, old):
        sent(run)
    assert watchdog.sweep(workers=Held(), now=later(101)).redispatched_steps == 3


def test_a_compensation_past_its_timeout_is_dispatched_again():
    from recovery.core.errors import PermanentError

    # Given a run compensating step 0 (its timeout, 5 s, holds for its compensation too)
    saga = Saga("undo", steps=[Step(ONE, compensate=TWO, timeout_seconds=5), Step(ONE)])
    run = start(saga)
    sagas.on_task_succeeded({"run": run.pk, "step": 0, "role": "step"}, {},
                            f"saga-{run.pk}-0-step")
    sagas.on_task_parked({"run": run.pk, "step": 1, "role": "step"}, f"saga-{run.pk}-1-step",
                         PermanentError("refused"))
    run.refresh_from_db()
    assert run.status == "compensating"
    sent(run)
    assert watchdog.sweep(workers=Held(), now=later(3)).redispatched_steps == 0
    assert watchdog.sweep(workers=Held(), now=later(6)).redispatched_steps == 1
    row = step_row(run, 0, "compensation")
    assert (row.task_id, row.dispatches) == (f"saga-{run.pk}-0-compensation.2", 2)
    intent = OutboxMessage.objects.get(task_id=row.task_id)
    assert intent.signature["kwargs"] == {"idempotency_key": f"{run.pk}:0:compensation"}
    assert SagaEvent.objects.get(run=run).outcome.startswith(
        f"compensation 0 ({TWO}) dispatched again as")


def test_a_step_that_moved_on_meanwhile_is_not_dispatched_again():
    run = start()
    first = f"saga-{run.pk}-0-step"
    assert sagas.redispatch(step_row(run), task_id="saga-other") is None
    assert sagas.redispatch(step_row(run), task_id=first,
                            dispatched_before=timezone.now() - timedelta(seconds=60)) is None
    sagas.on_task_succeeded({"run": run.pk, "step": 0, "role": "step"}, {}, first)
    assert sagas.redispatch(step_row(run), task_id=first) is None
    assert not SagaEvent.objects.exists()


def test_a_step_timeout_must_be_positive_and_is_stored_only_when_set():
    with pytest.raises(SagaDefinitionError, match="timeout_seconds must be a positive number"):
        Step(ONE, timeout_seconds=0)
    with pytest.raises(SagaDefinitionError, match="timeout_seconds must be a positive number"):
        Step(ONE, timeout_seconds=True)
    assert "timeout_seconds" not in Step(ONE).to_dict()  # a saga's version digest is unchanged
    assert Step(ONE, timeout_seconds=30).to_dict()["timeout_seconds"] == 30.0
    assert (Saga("s", steps=[Step(ONE)]).definition["version"]
            != Saga("s", steps=[Step(ONE, timeout_seconds=30)]).definition["version"])


# -- 3. letters left replaying --------------------------------------------------------------


def letter(n: int, status: str = "replaying", **fields) -> DeadLetter:
    return DeadLetter.objects.create(task_id=f"task-{n}", task_name=HANG, status=status,
                                     fingerprint="f" * 40, replay_count=1, **fields)


def test_letters_replaying_too_long_go_back_to_parked_with_an_event_and_one_incident(
        watchdog_settings):
    watchdog_settings(REPLAYING_AFTER_SECONDS=60)
    lost = [letter(1), letter(2)]
    running = letter(3)      # a worker still runs its replay
    waiting = letter(4)      # its replay waits for a delayed retry
    parked = letter(5, status="parked")
    DueRetry.objects.create(task_id=waiting.task_id, task_name=HANG, due_at=later(600),
                            signature={})
    assert watchdog.sweep(workers=Held(holding={running.task_id}), now=later(30)).lost_replays == 0
    report = watchdog.sweep(workers=Held(holding={running.task_id}), now=later(61))
    assert report.lost_replays == 2
    statuses = dict(DeadLetter.objects.values_list("pk", "status"))
    assert [statuses[x.pk] for x in (*lost, running, waiting, parked)] == [
        "parked", "parked", "replaying", "replaying", "parked"]
    for x in lost:
        (event,) = DeadLetterEvent.objects.filter(letter=x)
        assert (event.action, event.actor) == ("replay_lost", "watchdog")
        assert "never reported back" in event.outcome and "not published again" in event.outcome
        x.refresh_from_db()
        assert x.replay_count == 1  # it was published: the count stays
    incident = Incident.objects.get()
    assert (incident.fingerprint, incident.reason) == ("watchdog:replaying", "stuck_replay")
    assert [item["letter"] for item in incident.details["letters"]] == [lost[0].pk, lost[1].pk]
    assert set(incident.letters.values_list("pk", flat=True)) == {x.pk for x in lost}
    assert not OutboxMessage.objects.exists()  # nothing published again
    # Parked, they are not replaying any more: the next sweep finds nothing
    assert watchdog.sweep(workers=Held(holding={running.task_id}), now=later(61)).lost_replays == 0


@pytest.mark.django_db(transaction=True)
def test_a_replay_reporting_back_at_the_same_moment_wins(watchdog_settings):
    watchdog_settings(REPLAYING_AFTER_SECONDS=60)
    finishing = letter(1)
    locked, release = threading.Event(), threading.Event()

    def replay_succeeds():
        # What RecoveryTask does when the replayed run succeeds, in its own connection,
        # holding the row while the sweep runs.
        try:
            with transaction.atomic():
                DeadLetter.objects.filter(pk=finishing.pk, status="replaying").update(
                    status="resolved", updated_at=timezone.now())
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    worker = threading.Thread(target=replay_succeeds)
    worker.start()
    assert locked.wait(10)
    try:
        report = watchdog.sweep(workers=Held(), now=later(61))
    finally:
        release.set()
        worker.join(10)
    assert report.lost_replays == 0
    finishing.refresh_from_db()
    assert finishing.status == "resolved"
    assert not DeadLetterEvent.objects.exists()
    assert not Incident.objects.exists()


# -- 4. outbox intents not sent -------------------------------------------------------------


def test_outbox_messages_unsent_too_long_are_escalated_with_count_and_oldest_age():
    now = timezone.now()
    for n, age in enumerate((900, 400, 100)):
        OutboxMessage.objects.create(task_id=f"o-{n}", task_name="tasks.send_invoice",
                                     signature={}, created_at=now - timedelta(seconds=age),
                                     attempts=7, last_error="OperationalError: Connection refused")
    OutboxMessage.objects.create(task_id="o-sent", task_name="tasks.send_invoice", signature={},
                                 created_at=now - timedelta(seconds=3000), sent_at=now)
    report = watchdog.sweep(workers=Held(), now=now)
    assert report.unsent_outbox == 2
    incident = Incident.objects.get()
    assert (incident.fingerprint, incident.reason) == ("watchdog:outbox", "outbox_stuck")
    assert incident.details["count"] == 2
    assert 899 < incident.details["oldest_age_seconds"] < 902
    assert incident.details["by_task"] == {"tasks.send_invoice": 2}
    assert incident.details["last_errors"] == {"OperationalError: Connection refused": 2}
    assert [row["task_id"] for row in incident.details["oldest"]] == ["o-0", "o-1"]


# -- the sweep ------------------------------------------------------------------------------


def test_one_failing_check_does_not_stop_the_others():
    OutboxMessage.objects.create(task_id="o-1", task_name="t", signature={},
                                 created_at=timezone.now() - timedelta(hours=1))
    report = watchdog.sweep(workers=Held(broken=True))
    assert report.failed_checks == ("tasks",)
    assert report.unsent_outbox == 1
    assert Incident.objects.get().fingerprint == "watchdog:outbox"
    assert "checks that failed: tasks" in report.summary()


@pytest.mark.django_db(transaction=True)
def test_a_sweep_does_nothing_while_another_is_running():
    OutboxMessage.objects.create(task_id="o-1", task_name="t", signature={},
                                 created_at=timezone.now() - timedelta(hours=1))
    holding, done = threading.Event(), threading.Event()

    def other_sweep():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock(%s)", [watchdog.LOCK_KEY])
                holding.set()
                done.wait(10)
                cursor.execute("SELECT pg_advisory_unlock(%s)", [watchdog.LOCK_KEY])
        finally:
            connections.close_all()

    thread = threading.Thread(target=other_sweep)
    thread.start()
    assert holding.wait(10)
    try:
        assert watchdog.sweep(workers=Held()) == Report(skipped=True)
    finally:
        done.set()
        thread.join(10)
    assert not Incident.objects.exists()
    assert watchdog.sweep(workers=Held()).unsent_outbox == 1


def test_manage_py_watchdog_dry_run_prints_the_report_and_changes_nothing(broker):
    OutboxMessage.objects.create(task_id="o-1", task_name="t", signature={},
                                 created_at=timezone.now() - timedelta(hours=1))
    out = StringIO()
    call_command("watchdog", "--dry-run", stdout=out)
    assert out.getvalue().strip() == (
        "watchdog (dry run, nothing changed): 0 stuck task(s), 0 saga step(s) to dispatch "
        "again, 0 stuck saga step(s), 0 lost replay(s), 1 unsent outbox message(s)")
    assert not Incident.objects.exists()
    out = StringIO()
    call_command("watchdog", stdout=out)
    assert "1 unsent outbox message(s)" in out.getvalue()
    assert Incident.objects.get().fingerprint == "watchdog:outbox"


# -- review fixes ---------------------------------------------------------------------------


def test_a_replay_given_up_for_lost_that_succeeds_later_still_resolves_its_letter(
        watchdog_settings):
    from recovery.operations.replay import mark_replay_succeeded

    watchdog_settings(REPLAYING_AFTER_SECONDS=60)
    late = letter(1, last_failed_at=timezone.now() - timedelta(minutes=5))
    # Given the watchdog parked the letter first (its replay was queued behind a backlog)
    assert watchdog.sweep(workers=Held(), now=later(61)).lost_replays == 1
    late.refresh_from_db()
    assert late.status == "parked"
    # When the replayed run finally succeeds
    assert mark_replay_succeeded(late.task_id) == 1
    # Then the letter is resolved, with the reason in its trail
    late.refresh_from_db()
    assert late.status == "resolved"
    assert late.events.order_by("-at", "-pk").first().outcome.startswith(
        "the replay the watchdog gave up for lost reported back")


def test_a_letter_parked_again_for_its_own_reason_is_not_resolved_by_a_late_success(
        watchdog_settings):
    from recovery.operations.replay import mark_replay_succeeded

    watchdog_settings(REPLAYING_AFTER_SECONDS=60)
    late = letter(1, last_failed_at=timezone.now() - timedelta(minutes=5))
    watchdog.sweep(workers=Held(), now=later(61))
    DeadLetter.objects.filter(pk=late.pk).update(last_failed_at=later(120))  # failed again
    assert mark_replay_succeeded(late.task_id) == 0
    late.refresh_from_db()
    assert late.status == "parked"


class Broadcasts:
    """An app whose ``control.inspect(...).<command>()`` returns ``replies[command]``, as
    Celery's remote control hands back the workers' answers, and records what was asked."""

    def __init__(self, **replies) -> None:
        self.replies = replies
        self.asked: list[tuple[str, dict]] = []
        self.control = self

    def inspect(self, **options):
        broadcasts = self

        class Inspect:
            def __getattr__(self, command):
                def ask():
                    broadcasts.asked.append((command, options))
                    return broadcasts.replies.get(command)
                return ask

        return Inspect()


def test_when_no_worker_answers_nothing_is_taken_for_lost():
    from recovery.observe.watchdog import BrokerWorkers, WorkersUnreachable

    with pytest.raises(WorkersUnreachable, match="no worker answered"):
        BrokerWorkers(Broadcasts(), alive=lambda: set()).holding(["task-1"])


def test_work_waiting_for_its_eta_prefetched_or_running_is_held_and_asked_once_per_sweep():
    from recovery.observe.watchdog import BrokerWorkers

    app = Broadcasts(
        scheduled={"a@h": [{"eta": "2026-12-05T08:00:00+00:00", "priority": 6,
                            "request": info("retrying", started=None, worker="a@h")}],
                   "b@h": []},
        reserved={"a@h": [info("prefetched", started=None, worker="a@h")], "b@h": []},
        active={"a@h": [], "b@h": [info("running", started=time.time(), worker="b@h")]},
    )
    workers = BrokerWorkers(app, timeout=2.5, alive=lambda: {"a@h", "b@h"})
    assert workers.holding(["retrying", "prefetched", "running", "gone"]) == {
        "retrying", "prefetched", "running"}
    assert workers.holding(["gone", "running"]) == {"running"}
    # Asked in the order a request moves (ETA, prefetched, running), each once; the
    # broadcast stops waiting once both live workers answered
    assert app.asked == [(command, {"timeout": 2.5, "limit": 2})
                         for command in ("scheduled", "reserved", "active")]


def test_a_live_worker_that_does_not_answer_leaves_what_it_holds_unknown():
    from recovery.observe.watchdog import BrokerWorkers, WorkersUnreachable

    # b@h stamped itself alive, but only a@h answers (b's main process is stopped)
    app = Broadcasts(scheduled={"a@h": []}, reserved={"a@h": []}, active={"a@h": []})
    with pytest.raises(WorkersUnreachable, match=r"1 live worker did not answer within 1s "
                                                 r"\(b@h\)"):
        BrokerWorkers(app, timeout=1, alive=lambda: {"a@h", "b@h"}).holding(["task-1"])
    # A worker that answered one question but not the next is not known either
    app = Broadcasts(scheduled={"a@h": [], "c@h": []}, reserved={"a@h": []}, active={"a@h": []})
    with pytest.raises(WorkersUnreachable, match=r"\(c@h\)"):
        BrokerWorkers(app, timeout=1, alive=lambda: {"a@h"}).holding(["task-1"])


def test_a_sweep_that_cannot_know_what_the_workers_hold_says_so_and_parks_nothing(
        watchdog_settings, caplog):
    from recovery.observe.watchdog import BrokerWorkers

    watchdog_settings(REPLAYING_AFTER_SECONDS=60)
    waiting = letter(1)
    app = Broadcasts(scheduled={"a@h": []}, reserved={"a@h": []}, active={"a@h": []})
    report = watchdog.sweep(app=app, workers=BrokerWorkers(app, alive=lambda: {"a@h", "b@h"}),
                            now=later(61))
    assert report.lost_replays == 0 and "replaying" in report.failed_checks
    assert report.undecided == "1 live worker did not answer within 1s (b@h); what they hold " \
                               "is unknown"
    assert "took nothing for lost: 1 live worker did not answer" in report.summary()
    waiting.refresh_from_db()
    assert waiting.status == "replaying"


def test_unreachable_workers_fail_the_checks_that_act_and_recover_nothing(watchdog_settings):
    watchdog_settings(REPLAYING_AFTER_SECONDS=60)
    waiting = letter(1)
    report = watchdog.sweep(workers=Held(broken=True), now=later(61))
    assert "replaying" in report.failed_checks
    waiting.refresh_from_db()
    assert waiting.status == "replaying"


def test_setup_after_the_configuration_was_read_still_schedules_the_watchdog():
    from celery import Celery

    import recovery

    app = Celery("late", set_as_current=False)
    app.conf.timezone = "UTC"  # reading or writing the conf finalises the configuration
    _ = app.conf.beat_schedule
    recovery.setup(app)
    assert app.conf.beat_schedule["recovery-watchdog"]["task"] == "recovery.watchdog"
    assert "recovery.observe.watchdog" in app.conf.include
    assert app.conf.broker_transport_options["visibility_timeout"] > 0
