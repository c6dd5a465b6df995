"""recovery.observe.escalation against the real PostgreSQL test database: which parked letters
open an incident, one incident per fingerprint while it is open, one notification per
channel however often the threshold is crossed, and parking that never waits on it."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from recovery.observe import escalation
from recovery.core import headers as hdr
from recovery.observe.escalation import EscalationRules, Occurrence
from recovery.core.fingerprint import fingerprint
from recovery.models import DeadLetter, Incident, IncidentNotification, SagaRun
from recovery.store.parking import ParkRecord, park

db = pytest.mark.django_db(transaction=True)

WEBHOOK = {"WEBHOOK_URL": "http://127.0.0.1:9/hook", "WEBHOOK_SECRET": "s3cret"}


@pytest.fixture
def escalation_settings(settings):
    def apply(**values):
        settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": values}

    return apply


def record(n: int = 1, **overrides) -> ParkRecord:
    data = dict(
        task_id=f"task-{n}",
        task_name="tasks.import_row",
        kind="data_integrity",
        reason="permanent failure (IntegrityError)",
        exception_type="django.db.utils.IntegrityError",
        exception_message=f"duplicate key value violates unique constraint for row {n}",
        traceback="Traceback (most recent call last):\n  File \"tasks.py\", line 3\n",
        args=[n],
        kwargs={"api_token": "tok_live_abc", "row": n},
        permanent=True,
        history=[{"attempt": 1, "replay": 0, "at": timezone.now().isoformat(),
                  "exception_type": "django.db.utils.IntegrityError",
                  "exception_message": f"duplicate key for row {n}", "kind": "data_integrity",
                  "delay_seconds": None}],
        queue="imports",
        worker="celery@w1",
        failed_at=timezone.now().isoformat(),
    )
    data.update(overrides)
    return ParkRecord(**data)


FP = fingerprint("tasks.import_row", "django.db.utils.IntegrityError",
                 "duplicate key value violates unique constraint for row 1")


# -- rules --------------------------------------------------------------------------------------


def test_rules_merge_user_values_over_the_defaults():
    chosen = EscalationRules.from_dict({"THRESHOLD_LETTERS": 3, "CRITICAL_TASKS": ["a.b"]})
    assert chosen.threshold_letters == 3
    assert chosen.threshold_minutes == 15.0
    assert chosen.critical_tasks == frozenset({"a.b"})
    assert chosen.webhook_url is None


@pytest.mark.parametrize("values, message", [
    ({"THRESHOLD_LETTER": 3}, "unknown RECOVERY['ESCALATION'] keys: THRESHOLD_LETTER"),
    ({"THRESHOLD_LETTERS": 0}, "THRESHOLD_LETTERS must be a positive integer or None"),
    ({"THRESHOLD_MINUTES": 0}, "THRESHOLD_MINUTES must be positive"),
    ({"CRITICAL_TASKS": "tasks.charge"}, "CRITICAL_TASKS must be a list"),
    ({"WEBHOOK_URL": "ftp://x"}, "WEBHOOK_URL must be an http(s) URL"),
    ({"WEBHOOK_URL": "https://x"}, "WEBHOOK_URL needs WEBHOOK_SECRET"),
    ({"MAX_ATTEMPTS": 0}, "MAX_ATTEMPTS must be at least 1"),
])
def test_bad_rules_are_refused_with_a_message_that_says_what_to_fix(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        EscalationRules.from_dict(values)


def test_threshold_can_be_switched_off():
    assert EscalationRules.from_dict({"THRESHOLD_LETTERS": None}).threshold_letters is None


# -- threshold ----------------------------------------------------------------------------------


@db
def test_a_fingerprint_opens_one_incident_when_it_reaches_the_threshold(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=3, THRESHOLD_MINUTES=10, **WEBHOOK)

    park(record(1))
    park(record(2))
    assert not Incident.objects.exists()

    park(record(3))

    incident = Incident.objects.get()
    assert incident.reason == Incident.Reason.THRESHOLD
    assert incident.status == Incident.Status.OPEN
    assert incident.fingerprint == FP
    assert incident.task_name == "tasks.import_row"
    assert incident.queue == "imports"
    assert incident.count == 3
    assert "3 dead letters in 10 min" in incident.title
    assert sorted(incident.letters.values_list("task_id", flat=True)) == [
        "task-1", "task-2", "task-3"]
    assert [(n.channel, n.event, n.status) for n in incident.notifications.all()] == [
        ("webhook", "opened", "pending")]


@db
def test_crossing_the_threshold_again_adds_to_the_open_incident_and_notifies_nobody_again(
        escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=2, **WEBHOOK)
    for n in range(1, 13):
        park(record(n))

    incident = Incident.objects.get()
    assert incident.count == 12  # opened by the 2nd letter with the 1st, then 10 more
    assert incident.letters.count() == 12
    assert IncidentNotification.objects.count() == 1
    # A storm refreshes the diagnostics at most once a second: a second later, the next
    # letter's diagnostics replace them.
    Incident.objects.update(last_seen_at=timezone.now() - timedelta(seconds=2))
    park(record(13))
    incident.refresh_from_db()
    assert incident.details["task_id"] == "task-13"
    assert incident.count == 13


@db
def test_letters_outside_the_window_do_not_count(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=2, THRESHOLD_MINUTES=5)
    park(record(1, failed_at=(timezone.now() - timedelta(minutes=6)).isoformat()))
    park(record(2))
    assert not Incident.objects.exists()
    park(record(3))
    assert Incident.objects.count() == 1


@db
def test_a_resolved_incident_stays_closed_and_the_next_occurrence_opens_a_new_one(
        escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=1, **WEBHOOK)
    park(record(1))
    first = Incident.objects.get()
    escalation.resolve(first, actor="alice", note="fixed the import file")

    park(record(2))

    first.refresh_from_db()
    assert first.status == Incident.Status.RESOLVED
    assert first.resolved_by == "alice"
    assert first.count == 1
    second = Incident.objects.exclude(pk=first.pk).get()
    assert second.status == Incident.Status.OPEN
    assert list(second.letters.values_list("task_id", flat=True)) == ["task-2"]
    # The first incident's webhook heard of its resolution; the second of its opening.
    assert sorted(IncidentNotification.objects.values_list("incident_id", "event")) == sorted([
        (first.pk, "opened"), (first.pk, "resolved"), (second.pk, "opened")])


@db
def test_an_acknowledged_incident_still_collects_occurrences(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=1)
    park(record(1))
    incident = escalation.acknowledge(Incident.objects.get(), actor="bob")
    park(record(2))
    incident.refresh_from_db()
    assert incident.status == Incident.Status.ACKNOWLEDGED
    assert incident.acknowledged_by == "bob"
    assert incident.count == 2
    assert Incident.objects.count() == 1


@db
def test_resolving_twice_notifies_once(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=1, **WEBHOOK)
    park(record(1))
    incident = Incident.objects.get()
    escalation.resolve(incident, actor="a")
    escalation.resolve(incident, actor="b")
    incident.refresh_from_db()
    assert incident.resolved_by == "a"
    assert incident.notifications.filter(event="resolved").count() == 1


# -- critical tasks and compensations -----------------------------------------------------------


@db
def test_a_critical_task_escalates_on_its_first_dead_letter(escalation_settings):
    escalation_settings(CRITICAL_TASKS=["tasks.charge_card"], THRESHOLD_LETTERS=100)
    park(record(1, task_name="tasks.charge_card", exception_message="card declined"))

    incident = Incident.objects.get()
    assert incident.reason == Incident.Reason.CRITICAL_TASK
    assert incident.severity == Incident.Severity.CRITICAL
    assert incident.title == "Critical task tasks.charge_card failed: IntegrityError: card declined"


@db
def test_a_task_class_marked_critical_escalates_too(escalation_settings):
    from celery import current_app as app

    from recovery.task import RecoveryTask

    @app.task(base=RecoveryTask, name="tests.escalation.critical_probe", critical=True,
              shared=False)
    def critical_probe():  # pragma: no cover - never run, only looked up by name
        pass

    try:
        escalation_settings(THRESHOLD_LETTERS=100)
        park(record(1, task_name="tests.escalation.critical_probe"))
        assert Incident.objects.get().reason == Incident.Reason.CRITICAL_TASK
    finally:
        app.tasks.pop("tests.escalation.critical_probe", None)


@db
def test_an_ordinary_task_below_the_threshold_does_not_escalate(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=100)
    park(record(1))
    assert not Incident.objects.exists()


@db
def test_a_failed_compensation_escalates(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=100)
    park(record(1, task_name="tasks.cancel_order",
                headers={"headers": {hdr.COMPENSATES: "charge-77"}}))
    incident = Incident.objects.get()
    assert incident.reason == Incident.Reason.COMPENSATION_FAILED
    assert incident.severity == Incident.Severity.CRITICAL
    assert incident.title.startswith("Compensation tasks.cancel_order failed")


@db
def test_compensation_failures_can_be_left_to_the_threshold(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=100, ON_COMPENSATION_FAILURE=False)
    park(record(1, headers={"headers": {hdr.COMPENSATES: "charge-77"}}))
    assert not Incident.objects.exists()


@db
def test_a_saga_needing_a_human_opens_an_incident_linked_to_its_run(escalation_settings):
    from recovery.workflows.sagas import escalate as escalate_saga

    escalation_settings()
    run = SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                                 status=SagaRun.Status.NEEDS_HUMAN,
                                 context={"order_id": 5, "card_token": "tok_x"})
    escalate_saga(run, "compensation tasks.release_stock failed for good")

    incident = Incident.objects.get()
    assert incident.reason == Incident.Reason.COMPENSATION_FAILED
    assert incident.saga_run_id == run.pk
    assert incident.details["context"]["card_token"] != "tok_x"
    assert incident.details["context"]["order_id"] == 5


# -- diagnostics --------------------------------------------------------------------------------


@db
def test_an_incident_carries_what_an_engineer_needs_with_secrets_masked(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=1, ADMIN_BASE_URL="https://ops.example.com/")
    park(record(1))
    letter = DeadLetter.objects.get()
    details = Incident.objects.get().details

    assert details["task"] == "tasks.import_row"
    assert details["task_id"] == "task-1"
    assert details["kwargs"]["row"] == 1
    assert details["kwargs"]["api_token"] != "tok_live_abc"
    assert "tok_live_abc" not in str(details)
    assert details["exception"]["type"] == "django.db.utils.IntegrityError"
    assert details["traceback"].startswith("Traceback")
    assert details["history"][0]["attempt"] == 1
    assert details["classification"] == {"kind": "data_integrity", "permanent": True,
                                         "reason": "permanent failure (IntegrityError)"}
    assert details["links"]["letter"] == (
        f"https://ops.example.com/admin/recovery/deadletter/{letter.pk}/change/")
    assert details["links"]["group"].startswith(
        "https://ops.example.com/admin/recovery/deadletter/?fingerprint=")


# -- isolation and concurrency ------------------------------------------------------------------


@db
def test_parking_never_fails_because_escalation_does(escalation_settings, monkeypatch, caplog):
    escalation_settings(THRESHOLD_LETTERS=1)

    def broken(*args, **kwargs):
        raise RuntimeError("incident table on fire")

    monkeypatch.setattr(escalation, "_escalate_letter", broken)
    outcome = park(record(1))

    assert outcome.letter_id == DeadLetter.objects.get().pk
    assert "could not escalate tasks.import_row[task-1]" in caplog.text


@db
def test_invalid_escalation_settings_never_stop_parking(escalation_settings, caplog):
    escalation_settings(THRESHOLD_LETTERS="ten")
    outcome = park(record(1))
    assert outcome.letter_id is not None
    assert "RECOVERY['ESCALATION'] is invalid" in caplog.text


@db
def test_concurrent_escalations_of_one_fingerprint_open_one_incident(escalation_settings):
    escalation_settings(**WEBHOOK)
    barrier = threading.Barrier(6)
    results = []

    def go(n):
        try:
            barrier.wait()
            results.append(escalation.escalate(Occurrence(
                fingerprint="watchdog:task:tasks.slow", reason=Incident.Reason.STUCK_TASK,
                title=f"tasks.slow stuck ({n})")))
        finally:
            connection.close()

    threads = [threading.Thread(target=go, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    incident = Incident.objects.get()
    assert {r.pk for r in results} == {incident.pk}
    assert incident.count == 6
    assert IncidentNotification.objects.count() == 1


@db
def test_parking_inside_the_callers_transaction_escalates_after_its_commit(escalation_settings):
    from django.db import transaction

    escalation_settings(THRESHOLD_LETTERS=1)
    with transaction.atomic():
        park(record(1))
        assert not Incident.objects.exists()  # nothing locked or written before the commit
    assert Incident.objects.get().letters.get().task_id == "task-1"


@db
def test_a_database_error_in_escalation_never_aborts_the_callers_transaction(
        escalation_settings, monkeypatch, caplog):
    from django.db import transaction

    escalation_settings(THRESHOLD_LETTERS=1)

    def broken(*args, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM recovery_no_such_table")

    monkeypatch.setattr(escalation, "_escalate_letter", broken)
    with transaction.atomic():
        park(record(1))
        # the caller's transaction is still usable after the park
        assert DeadLetter.objects.count() == 1
        DeadLetter.objects.update(reason="still writable")
    assert DeadLetter.objects.get().reason == "still writable"
    assert "could not escalate tasks.import_row[task-1]" in caplog.text


@db
def test_each_saga_run_that_needs_a_human_gets_its_own_incident(escalation_settings):
    from recovery.workflows.sagas import escalate as escalate_saga

    escalation_settings()
    runs = [SagaRun.objects.create(name="order", version="1", definition={"steps": []},
                                   status=SagaRun.Status.NEEDS_HUMAN) for _ in range(2)]
    for run in runs:
        escalate_saga(run, "compensation failed for good")
    assert sorted(Incident.objects.values_list("saga_run_id", flat=True)) == sorted(
        r.pk for r in runs)


@db
def test_letters_of_a_resolved_incident_do_not_count_towards_the_next(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=3)
    for n in (1, 2, 3):
        park(record(n))
    escalation.resolve(Incident.objects.get(), actor="erin")

    park(record(4))
    park(record(5))
    assert Incident.objects.count() == 1  # two new letters: below the threshold
    park(record(6))
    reopened = Incident.objects.exclude(status="resolved").get()
    assert sorted(reopened.letters.values_list("task_id", flat=True)) == [
        "task-4", "task-5", "task-6"]


# -- a storm's letters: linked in the letter's own statement --------------------------------------


def _statements_while(action) -> list[str]:
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        action()
    return [q["sql"] for q in captured.captured_queries]


@db
def test_a_letter_of_an_open_incident_is_linked_and_counted_by_its_own_statement(
        escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=1)
    park(record(1))
    incident = Incident.objects.get()

    statements = _statements_while(lambda: park(record(2)))

    # One round trip parks the letter, links it and counts it; within a second of the
    # last letter the diagnostics are not rewritten.
    assert len(statements) == 1, statements
    assert "recovery_incident_letters" in statements[0]
    incident.refresh_from_db()
    assert incident.count == 2
    assert sorted(incident.letters.values_list("task_id", flat=True)) == ["task-1", "task-2"]
    assert Incident.objects.count() == 1
    assert incident.details["task_id"] == "task-1"

    # A second later the next letter's diagnostics replace the incident's (one more statement).
    Incident.objects.update(last_seen_at=timezone.now() - timedelta(seconds=2))
    statements = _statements_while(lambda: park(record(3)))
    assert len(statements) == 2, statements
    incident.refresh_from_db()
    assert (incident.count, incident.details["task_id"]) == (3, "task-3")


@db
def test_a_letter_with_no_open_incident_costs_no_second_look_up(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=None)
    statements = _statements_while(lambda: park(record(1)))
    assert len(statements) == 1, statements
    assert not Incident.objects.exists()
    assert DeadLetter.objects.get().task_id == "task-1"


@db
def test_a_letter_of_a_resolved_incident_is_not_linked_to_it(escalation_settings):
    escalation_settings(THRESHOLD_LETTERS=None, CRITICAL_TASKS=["tasks.import_row"])
    park(record(1))
    first = Incident.objects.get()
    escalation.resolve(first, actor="alice")

    park(record(2))

    first.refresh_from_db()
    assert (first.count, list(first.letters.values_list("task_id", flat=True))) == (1, ["task-1"])
    second = Incident.objects.exclude(pk=first.pk).get()
    assert list(second.letters.values_list("task_id", flat=True)) == ["task-2"]


@db
def test_a_letter_waits_for_an_incident_another_transaction_holds_and_is_counted_once(
        escalation_settings):
    import psycopg

    escalation_settings(THRESHOLD_LETTERS=1)
    park(record(1))
    incident = Incident.objects.get()
    settings_dict = connection.settings_dict
    other = psycopg.connect(host=settings_dict["HOST"], port=settings_dict["PORT"],
                            user=settings_dict["USER"], dbname=settings_dict["NAME"])
    held = threading.Event()

    def hold_for_a_moment():
        with other.transaction():
            other.execute("SELECT id FROM recovery_incident WHERE id = %s FOR UPDATE",
                          [incident.pk])
            held.set()
            threading.Event().wait(0.5)

    holder = threading.Thread(target=hold_for_a_moment)
    holder.start()
    try:
        assert held.wait(10)
        began = time.monotonic()
        outcome = park(record(2))
        waited = time.monotonic() - began
    finally:
        holder.join(10)
        other.close()
    assert waited >= 0.3  # it did wait for the lock, then wrote
    assert outcome.letter_id == DeadLetter.objects.get(task_id="task-2").pk
    incident.refresh_from_db()
    assert incident.count == 2
    assert incident.letters.count() == 2


@db
def test_an_incident_table_that_refuses_the_update_never_costs_the_letter(
        escalation_settings, caplog):
    escalation_settings(THRESHOLD_LETTERS=1)
    park(record(1))
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE FUNCTION test_refuse_incident() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'incident table refuses updates'; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER test_refuse_incident BEFORE UPDATE ON recovery_incident
            FOR EACH ROW EXECUTE FUNCTION test_refuse_incident();
        """)
    try:
        outcome = park(record(2))
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER test_refuse_incident ON recovery_incident; "
                           "DROP FUNCTION test_refuse_incident();")
    # The one statement failed as a whole; the general path parked the letter, and
    # escalation, which the same refusal stops, said why it could not add it.
    letter = DeadLetter.objects.get(task_id="task-2")
    assert outcome.letter_id == letter.pk
    assert letter.status == DeadLetter.Status.PARKED
    assert "could not escalate tasks.import_row[task-2]" in caplog.text
    assert Incident.objects.get().count == 1


@db
def test_the_fast_paths_link_is_taken_once_and_only_for_its_letter(escalation_settings):
    from recovery.store import pg_fastpath

    escalation_settings(THRESHOLD_LETTERS=1)
    park(record(1))
    # The escalation listener took the link of letter 1 already.
    assert pg_fastpath.take_incident_link(DeadLetter.objects.get().pk) is None
    pg_fastpath._last_link.set(pg_fastpath.IncidentLink(letter_id=7, incident_id=None))
    assert pg_fastpath.take_incident_link(8) is None
    assert pg_fastpath.take_incident_link(7) == pg_fastpath.IncidentLink(7, None)
    assert pg_fastpath.take_incident_link(7) is None


@db
def test_a_letter_whose_statement_ran_while_another_worker_opened_the_incident_joins_it(
        escalation_settings, monkeypatch):
    from recovery.store import pg_fastpath

    escalation_settings(THRESHOLD_LETTERS=None)
    first, second = park(record(1)).letter_id, park(record(2)).letter_id
    escalation_settings(THRESHOLD_LETTERS=2)
    take = pg_fastpath.take_incident_link
    opened = []

    def another_worker_opens_it_meanwhile(letter_id):
        # Letter 3's statement found no incident open. Another worker, whose threshold
        # window ({1, 2}) was read before letter 3 was committed, opens the incident now,
        # before letter 3's escalation looks.
        if not opened:
            incident, _ = escalation._upsert(Occurrence(
                fingerprint=FP, reason=Incident.Reason.THRESHOLD, title="2 dead letters",
                task_name="tasks.import_row", letter_ids=(first, second)), escalation.rules())
            opened.append(incident.count)
        return take(letter_id)

    monkeypatch.setattr(pg_fastpath, "take_incident_link", another_worker_opens_it_meanwhile)
    park(record(3))

    incident = Incident.objects.get()
    assert opened == [2]
    assert incident.count == 3
    assert sorted(incident.letters.values_list("task_id", flat=True)) == [
        "task-1", "task-2", "task-3"]


@db
def test_a_letter_whose_statement_loses_the_incidents_lock_is_written_without_it(
        escalation_settings, monkeypatch):
    from django.db import OperationalError
    import psycopg

    from recovery.store import pg_fastpath

    escalation_settings(THRESHOLD_LETTERS=1)
    park(record(1))

    def deadlocked(*args, **kwargs):
        try:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        except psycopg.Error as cause:
            raise OperationalError("deadlock detected") from cause

    monkeypatch.setattr(pg_fastpath, "insert_new_letter", deadlocked)
    outcome = park(record(2))

    # Not spooled as if the database were down: the general path wrote it, and
    # escalation linked it with its own statement.
    assert not outcome.spooled
    assert outcome.letter_id == DeadLetter.objects.get(task_id="task-2").pk
    assert Incident.objects.get().count == 2
