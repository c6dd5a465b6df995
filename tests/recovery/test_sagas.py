"""Sagas at the service level, on real PostgreSQL: declaration, start, advancing,
compensation, hold/resume and the operator operations.

No worker runs here: the hooks RecoveryTask calls (``on_task_succeeded``,
``on_task_parked``) are called directly with the header and task id a worker would
have, and what would be published is read from the outbox table (inside the test's
transaction nothing is published).
"""

from __future__ import annotations

import logging

import pytest
from celery.exceptions import Reject
from django.db import OperationalError

from recovery.operations import replay
from recovery.workflows import sagas
from recovery.core.errors import DependencyError
from recovery.models import DeadLetter, DeadLetterEvent, OutboxMessage, SagaRun, SagaStep
from recovery.store.parking import drain_spool
from recovery.workflows.sagas import Saga, SagaDefinitionError, SagaError, Step
from tests.integration import worker_tasks  # noqa: F401 - registers PLAIN

pytestmark = pytest.mark.django_db

RESERVE, RELEASE = "tasks.orders.reserve_inventory", "tasks.orders.release_inventory"
CHARGE, REFUND = "tasks.orders.charge_payment", "tasks.orders.refund_payment"
SHIP = "tasks.orders.create_shipment"
PLAIN = "tests.integration.worker_tasks.plain_fail"  # a plain celery.Task


def order_saga(name: str = "order", **options) -> Saga:
    return Saga(name, steps=[Step(RESERVE, compensate=RELEASE), Step(CHARGE, compensate=REFUND),
                             Step(SHIP)], **options)


def step(run: SagaRun, index: int, role: str = "step") -> SagaStep:
    return SagaStep.objects.get(run=run, index=index, role=role)


def header(run: SagaRun, index: int, role: str = "step") -> dict:
    return {"run": run.pk, "step": index, "role": role}


def succeed(run: SagaRun, index: int, retval=None, role: str = "step") -> None:
    """What RecoveryTask.on_success does when the current task of that step succeeds."""
    sagas.on_task_succeeded(header(run, index, role), retval, step(run, index, role).task_id)


def park(run: SagaRun, index: int, role: str = "step", exc: Exception | None = None) -> None:
    """What RecoveryTask._park does after the current task of that step was parked."""
    row = step(run, index, role)
    DeadLetter.objects.create(task_id=row.task_id, task_name=row.task_name, fingerprint="f" * 40,
                              headers={"headers": {"recovery_saga": header(run, index, role)}})
    sagas.on_task_parked(header(run, index, role), row.task_id,
                         exc or DependencyError("carrier rejected the address", permanent=True))


def published() -> list[tuple[str, str, list, dict, dict]]:
    """(task id, task, args, kwargs, saga header) of every saga intent, in order."""
    return [(row.task_id, row.signature["task"], row.signature["args"], row.signature["kwargs"],
             row.signature["options"]["headers"]["recovery_saga"])
            for row in OutboxMessage.objects.filter(task_id__startswith="saga-").order_by("pk")]


def refresh(run: SagaRun) -> SagaRun:
    run.refresh_from_db()
    return run


# -- declaration ----------------------------------------------------------------------------


def test_a_saga_needs_a_name_steps_and_a_known_failure_policy():
    with pytest.raises(SagaDefinitionError, match="no steps"):
        Saga("empty", steps=[])
    with pytest.raises(SagaDefinitionError, match="must be a Step"):
        Saga("bad", steps=[RESERVE])
    with pytest.raises(SagaDefinitionError, match="on_failure must be one of compensate, hold"):
        Saga("bad", steps=[Step(RESERVE)], on_failure="retry")
    with pytest.raises(SagaDefinitionError, match="needs a name"):
        Saga(" ", steps=[Step(RESERVE)])
    with pytest.raises(SagaDefinitionError, match="optional must be True or False"):
        Step(RESERVE, optional="yes")


def test_steps_must_be_registered_recovery_tasks():
    with pytest.raises(SagaDefinitionError, match="'shop.nowhere' is not registered"):
        Saga("ghost", steps=[Step(RESERVE, compensate="shop.nowhere")]).start(order_id=1)
    with pytest.raises(SagaDefinitionError, match="must be a RecoveryTask"):
        Saga("plain", steps=[Step(PLAIN)]).start(order_id=1)
    assert not SagaRun.objects.exists()


def test_task_objects_and_names_give_the_same_definition_and_version():
    from tasks import orders

    by_object = Saga("order", steps=[
        Step(orders.reserve_inventory, compensate=orders.release_inventory),
        Step(orders.charge_payment, compensate=orders.refund_payment),
        Step(orders.create_shipment),
    ])
    assert by_object.definition == order_saga().definition
    assert by_object.version == order_saga().version


def test_the_version_is_a_digest_of_steps_and_options_unless_given():
    base = order_saga().definition["version"]
    assert len(base) == 12
    assert order_saga(on_failure="hold").definition["version"] != base
    changed = Saga("order", steps=[Step(RESERVE, compensate=RELEASE), Step(CHARGE), Step(SHIP)])
    assert changed.definition["version"] != base
    explicit = order_saga(version="2026-11")
    assert explicit.definition["version"] == "2026-11"
    assert explicit.definition["digest"] == base


# -- start -----------------------------------------------------------------------------------


def test_start_persists_the_run_and_enqueues_step_0_with_the_context():
    run = order_saga().start(order_id=42, amount_cents=2500)
    assert run.status == SagaRun.Status.RUNNING and run.current_step == 0
    assert run.context == {"order_id": 42, "amount_cents": 2500}
    assert run.definition["steps"][1] == {"task": CHARGE, "compensate": REFUND, "optional": False}
    assert list(run.steps.values_list("index", "role", "status", "task_id")) == [
        (0, "step", "running", f"saga-{run.pk}-0-step"),
        (1, "step", "pending", ""),
        (2, "step", "pending", ""),
    ]
    assert published() == [(f"saga-{run.pk}-0-step", RESERVE,
                             [{"order_id": 42, "amount_cents": 2500}], {}, header(run, 0))]


def test_start_with_a_used_idempotency_key_returns_that_run_and_starts_nothing():
    first = order_saga().start(order_id=42, idempotency_key="order-42")
    again = order_saga().start(order_id=42, idempotency_key="order-42")
    assert again.pk == first.pk
    assert SagaRun.objects.count() == 1 and len(published()) == 1
    with pytest.raises(SagaError, match="already started run .* of saga 'order'"):
        order_saga("refund").start(order_id=42, idempotency_key="order-42")


def test_the_context_must_be_json():
    with pytest.raises(SagaError, match="JSON-serialisable"):
        order_saga().start(order_id=object())


# -- advancing -------------------------------------------------------------------------------


def test_a_step_result_is_merged_and_the_next_step_gets_the_merged_context():
    run = order_saga().start(order_id=42)
    succeed(run, 0, {"reservation_id": "r1"})
    run = refresh(run)
    assert run.context == {"order_id": 42, "reservation_id": "r1"}
    assert run.current_step == 1
    assert step(run, 0).status == "succeeded" and step(run, 0).result == {"reservation_id": "r1"}
    assert published()[-1] == (f"saga-{run.pk}-1-step", CHARGE,
                               [{"order_id": 42, "reservation_id": "r1"}], {}, header(run, 1))
    succeed(run, 1, None)  # None merges nothing
    succeed(run, 2, {"tracking": "t1"})
    run = refresh(run)
    assert run.status == "succeeded" and run.finished_at is not None
    assert run.context == {"order_id": 42, "reservation_id": "r1", "tracking": "t1"}


def test_a_duplicate_completion_does_not_advance_twice():
    run = order_saga().start(order_id=42)
    succeed(run, 0, {"reservation_id": "r1"})
    sagas.on_task_succeeded(header(run, 0), {"reservation_id": "r2"}, f"saga-{run.pk}-0-step")
    run = refresh(run)
    assert run.context["reservation_id"] == "r1"
    assert [p[0] for p in published()] == [f"saga-{run.pk}-0-step", f"saga-{run.pk}-1-step"]


def test_a_completion_under_another_task_id_is_ignored():
    run = order_saga().start(order_id=42)
    sagas.on_task_succeeded(header(run, 0), {}, "some-other-id")
    assert step(run, 0).status == "running" and len(published()) == 1


def test_a_run_continues_with_the_definition_it_started_with():
    run = order_saga().start(order_id=42)
    # The code changes: charging now comes first, and the saga gets a fourth step.
    Saga("order", steps=[Step(CHARGE, compensate=REFUND), Step(RESERVE, compensate=RELEASE),
                         Step(SHIP), Step(SHIP)]).start(order_id=43)
    succeed(run, 0, {})
    assert published()[-1][1] == CHARGE  # step 1 of the run's own definition
    succeed(run, 1, {})
    succeed(run, 2, {})
    assert refresh(run).status == "succeeded"


def test_the_start_of_each_attempt_is_counted():
    run = order_saga().start(order_id=1)

    class FakeTask:
        request = type("R", (), {"recovery_saga": header(run, 0), "is_eager": False})()

    for _ in range(2):  # the task_prerun receiver, as a worker calls it
        sagas._step_started(sender=FakeTask, task_id=f"saga-{run.pk}-0-step", task=FakeTask)
    row = step(run, 0)
    assert row.attempts == 2 and row.started_at is not None


def test_step_key_reads_the_saga_header():
    request = type("R", (), {"recovery_saga": {"run": 7, "step": 2, "role": "step"}})()
    assert sagas.step_key(request) == "7:2"
    assert sagas.step_key(type("R", (), {})()) is None
    compensation = type("R", (), {"recovery_saga": {"run": 7, "step": 2,
                                                    "role": "compensation"}})()
    # never the step's own key: an API with account-wide keys would confuse the two
    assert sagas.step_key(compensation) == "7:2:compensation"


def test_a_stale_step_message_is_not_current_once_the_run_moved_on():
    # Given a run whose shipment step was parked and which is now compensating
    run = order_saga().start(order_id=42)
    succeed(run, 0, {"reservation_id": "r1"})
    succeed(run, 1, {"payment_id": "p1"})
    running = step(run, 2).task_id
    assert sagas.is_current(header(run, 2), running)
    park(run, 2)
    # Then the shipment's message, coming back after a lost ack, must not run again
    assert not sagas.is_current(header(run, 2), running)
    assert not sagas.is_current(header(run, 2), running, replay=True)  # compensating: no
    # and a message under an id the step no longer has never runs
    assert not sagas.is_current(header(run, 1, "compensation"), "saga-0-1-compensation")
    assert sagas.is_current(header(run, 1, "compensation"), step(run, 1, "compensation").task_id)


def test_a_replay_of_the_failed_step_of_a_held_run_is_current():
    run = order_saga("held", on_failure="hold").start(order_id=7)
    succeed(run, 0)
    failed = step(run, 1).task_id
    park(run, 1)
    assert refresh(run).status == "held"
    assert not sagas.is_current(header(run, 1), failed)            # a stray redelivery
    assert sagas.is_current(header(run, 1), failed, replay=True)   # the operator's replay


# -- failure ---------------------------------------------------------------------------------


def test_a_step_failing_for_good_compensates_completed_steps_in_reverse_order():
    run = order_saga().start(order_id=42)
    succeed(run, 0, {"reservation_id": "r1"})
    succeed(run, 1, {"payment_id": "p1"})
    park(run, 2)
    run = refresh(run)
    assert run.status == "compensating" and "step 2 (tasks.orders.create_shipment)" in run.error
    assert step(run, 2).status == "failed" and "carrier rejected" in step(run, 2).error
    # its letter is closed: replaying it later would ship a cancelled order
    letter = DeadLetter.objects.get(task_id=f"saga-{run.pk}-2-step")
    assert letter.status == "compensated" and letter.events.get().actor == "system"
    context = {"order_id": 42, "reservation_id": "r1", "payment_id": "p1"}
    assert published()[-1] == (f"saga-{run.pk}-1-compensation", REFUND, [context],
                               {"idempotency_key": f"{run.pk}:1:compensation"}, header(run, 1, "compensation"))
    succeed(run, 1, {"refunded": True}, role="compensation")
    assert step(run, 1).status == "compensated"
    # a compensation's result stays on its row: only steps feed the context
    assert published()[-1][:4] == (f"saga-{run.pk}-0-compensation", RELEASE, [context],
                                   {"idempotency_key": f"{run.pk}:0:compensation"})
    assert step(run, 1, "compensation").result == {"refunded": True}
    # the compensation's message is redelivered: nothing happens twice
    succeed(run, 1, {"refunded": True}, role="compensation")
    succeed(run, 0, None, role="compensation")
    run = refresh(run)
    assert run.status == "compensated" and run.finished_at is not None
    assert [p[0].rsplit("-", 2)[1:] for p in published()] == [
        ["0", "step"], ["1", "step"], ["2", "step"], ["1", "compensation"], ["0", "compensation"]]


def test_the_first_step_failing_leaves_nothing_to_undo_and_the_run_failed():
    run = order_saga().start(order_id=42)
    park(run, 0)
    assert refresh(run).status == "failed"
    assert len(published()) == 1
    # nothing was undone: its letter stays parked, to replay (which continues the run) or
    # to resume the run from
    assert DeadLetter.objects.get(task_id=f"saga-{run.pk}-0-step").status == "parked"


def test_an_optional_step_failing_is_skipped_not_compensated():
    saga = Saga("with_optional", steps=[Step(RESERVE, compensate=RELEASE),
                                        Step(CHARGE, optional=True), Step(SHIP)])
    run = saga.start(order_id=42)
    succeed(run, 0, {})
    park(run, 1)
    assert step(run, 1).status == "skipped"
    assert published()[-1][1] == SHIP
    succeed(run, 2, {})
    assert refresh(run).status == "succeeded"


def test_a_held_run_waits_and_resumes_from_the_failed_step(django_user_model):
    run = order_saga(on_failure="hold").start(order_id=42)
    succeed(run, 0, {"reservation_id": "r1"})
    park(run, 1)
    run = refresh(run)
    assert run.status == "held" and len(published()) == 2
    with pytest.raises(SagaError, match="only held, needs-human or succeeded"):
        sagas.compensate(SagaRun.objects.create(name="x", version="1", definition={}))
    sagas.resume(run, actor="alice", note="card limit raised")
    run = refresh(run)
    assert run.status == "running" and run.error == ""
    assert published()[-1][:3] == (f"saga-{run.pk}-1-step.2", CHARGE,
                                   [{"order_id": 42, "reservation_id": "r1"}])
    assert step(run, 1).dispatches == 2 and step(run, 1).status == "running"
    letter = DeadLetter.objects.get(task_id=f"saga-{run.pk}-1-step")
    assert letter.status == "resolved"
    assert letter.events.get().outcome == f"superseded: saga run {run.pk} resumed from step 1"
    event = run.events.get()
    assert (event.action, event.actor, event.note) == ("resumed", "alice", "card limit raised")
    # the old attempt finishing late changes nothing; the new one advances the run
    sagas.on_task_succeeded(header(run, 1), {}, f"saga-{run.pk}-1-step")
    assert step(run, 1).status == "running"
    succeed(run, 1, {"payment_id": "p1"})
    succeed(run, 2, {})
    assert refresh(run).status == "succeeded"


def test_only_held_or_failed_runs_can_be_resumed():
    run = order_saga().start(order_id=42)
    with pytest.raises(SagaError, match="is running; only held or failed runs can be resumed"):
        sagas.resume(run)
    with pytest.raises(SagaError, match="only held, needs-human or succeeded"):
        sagas.compensate(run)


def test_a_held_run_compensated_by_hand():
    run = order_saga(on_failure="hold").start(order_id=42)
    succeed(run, 0, {})
    park(run, 1)
    sagas.compensate(run, actor="bob", note="customer cancelled")
    run = refresh(run)
    assert run.status == "compensating"
    assert published()[-1][0] == f"saga-{run.pk}-0-compensation"
    assert DeadLetter.objects.get(task_id=f"saga-{run.pk}-1-step").status == "compensated"
    assert run.events.get().outcome == "compensating from step 0"
    succeed(run, 0, {}, role="compensation")
    assert refresh(run).status == "compensated"


def test_a_failed_compensation_needs_a_human_and_is_escalated(caplog,
                                                            django_capture_on_commit_callbacks):
    run = order_saga().start(order_id=42)
    succeed(run, 0, {})
    succeed(run, 1, {})
    with caplog.at_level(logging.CRITICAL, logger="recovery.sagas"):
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            park(run, 2)
            park(run, 1, role="compensation",
                 exc=DependencyError("refund API rejected the payment id", permanent=True))
        escalations = [c for c in callbacks if getattr(c, "__name__", "") == "<lambda>"]
        for callback in escalations:
            callback()
    run = refresh(run)
    assert run.status == "needs_human"
    assert "compensation tasks.orders.refund_payment of step 1 failed for good" in run.error
    assert step(run, 1, "compensation").status == "failed"
    assert step(run, 1).status == "succeeded"  # still to undo
    assert "NEEDS A HUMAN" in caplog.text and f"manage.py saga compensate {run.pk}" in caplog.text
    assert run.events.get().action == "escalated"
    # the cause fixed, the operator compensates again: the failed compensation first
    sagas.compensate(run, actor="carol")
    run = refresh(run)
    assert run.status == "compensating"
    assert published()[-1][:4] == (f"saga-{run.pk}-1-compensation.2", REFUND, [{"order_id": 42}],
                                   {"idempotency_key": f"{run.pk}:1:compensation"})
    assert DeadLetter.objects.get(task_id=f"saga-{run.pk}-1-compensation").status == "resolved"
    succeed(run, 1, {}, role="compensation")
    succeed(run, 0, {}, role="compensation")
    assert refresh(run).status == "compensated"


def test_a_replayed_step_letter_that_succeeds_continues_a_held_run():
    run = order_saga(on_failure="hold").start(order_id=42)
    park(run, 0)
    assert refresh(run).status == "held"
    # dlq replay republishes the same task id with the saga header; it succeeds
    sagas.on_task_succeeded(header(run, 0), {"reservation_id": "r9"}, f"saga-{run.pk}-0-step")
    run = refresh(run)
    assert run.status == "running" and run.context["reservation_id"] == "r9"
    assert published()[-1][0] == f"saga-{run.pk}-1-step"


def test_resume_is_refused_while_the_failed_steps_letter_is_being_replayed():
    run = order_saga(on_failure="hold").start(order_id=42)
    park(run, 0)
    DeadLetter.objects.filter(task_id=f"saga-{run.pk}-0-step").update(status="replaying")
    with pytest.raises(SagaError, match="is being replayed"):
        sagas.resume(run)


def test_dead_letter_compensate_of_a_step_letter_compensates_its_run():
    run = order_saga(on_failure="hold").start(order_id=42)
    succeed(run, 0, {})
    park(run, 1)
    letter = DeadLetter.objects.get(task_id=f"saga-{run.pk}-1-step")
    replay.compensate(letter, actor="dave", note="order cancelled")
    letter.refresh_from_db()
    assert letter.status == "compensated"
    event = letter.events.get()
    assert (event.action, event.actor) == (DeadLetterEvent.Action.COMPENSATED, "dave")
    assert event.outcome == f"saga order run {run.pk}: compensating from step 0"
    assert refresh(run).status == "compensating"
    assert run.events.get().outcome.startswith(f"from dead letter {letter.pk}")
    assert published()[-1][0] == f"saga-{run.pk}-0-compensation"


def test_dead_letter_compensate_of_a_running_runs_letter_is_refused():
    run = order_saga().start(order_id=42)
    letter = DeadLetter.objects.create(task_id="stale", task_name=RESERVE, fingerprint="f" * 40,
                                       headers={"headers": {"recovery_saga": header(run, 0)}})
    with pytest.raises(replay.ReplayError, match="is running"):
        replay.compensate(letter)
    assert DeadLetter.objects.get(pk=letter.pk).status == "parked"


def test_bulk_compensate_handles_saga_letters():
    run = order_saga(on_failure="hold").start(order_id=42)
    succeed(run, 0, {})
    park(run, 1)
    result = replay.bulk("compensate", DeadLetter.objects.all(), actor="erin")
    assert result.done == 1 and result.ok
    assert refresh(run).status == "compensating"


def test_compensating_a_succeeded_run_and_one_with_nothing_to_undo():
    run = order_saga().start(order_id=42)
    for index in range(3):
        succeed(run, index, {})
    sagas.compensate(run, actor="frank")
    assert refresh(run).status == "compensating"
    assert published()[-1][0] == f"saga-{run.pk}-1-compensation"
    bare = Saga("bare", steps=[Step(SHIP)]).start(order_id=1)
    succeed(bare, 0, {})
    with pytest.raises(SagaError, match="nothing to compensate"):
        sagas.compensate(bare)


@pytest.mark.django_db(transaction=True)  # the failed write discards the connection
def test_a_completion_the_database_cannot_record_is_spooled_and_recorded_by_the_drain(
        monkeypatch):
    run = order_saga().start(order_id=42)
    real = sagas._succeeded

    def down(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(sagas, "_succeeded", down)
    succeed(run, 0, {"reservation_id": "r1"})  # no Reject: the step is not run again
    assert step(run, 0).status == "running"

    monkeypatch.setattr(sagas, "_succeeded", real)  # the database is back
    assert drain_spool() == 1
    run = refresh(run)
    assert step(run, 0).status == "succeeded"
    assert run.context["reservation_id"] == "r1"
    assert published()[-1][0] == f"saga-{run.pk}-1-step"


def test_a_completion_neither_the_database_nor_the_spool_can_keep_requeues_the_message(
        monkeypatch, settings, tmp_path):
    run = order_saga().start(order_id=42)

    def down(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    (tmp_path / "a-file").write_text("")
    settings.RECOVERY = {**settings.RECOVERY, "SPOOL_DIR": str(tmp_path / "a-file" / "spool")}
    paused: list[float] = []
    monkeypatch.setattr(sagas, "_succeeded", down)
    monkeypatch.setattr(sagas.time, "sleep", paused.append)
    with pytest.raises(Reject) as rejected:
        succeed(run, 0, {})
    assert rejected.value.requeue is True
    # not straight back into the queue: an outage must not become a tight loop of the step
    assert paused == [sagas._REQUEUE_PAUSE_SECONDS] and paused[0] >= 1


def test_reconcile_records_a_parked_step_the_hook_missed():
    run = order_saga().start(order_id=42)
    succeed(run, 0, {})
    DeadLetter.objects.create(task_id=f"saga-{run.pk}-1-step", task_name=CHARGE,
                              fingerprint="f" * 40, exception_message="card declined",
                              exception_type="recovery.errors.DependencyError")
    assert sagas.reconcile(older_than_seconds=0) == 1
    run = refresh(run)
    assert run.status == "compensating"
    assert step(run, 1).error == "recovery.errors.DependencyError: card declined"
    assert sagas.reconcile(older_than_seconds=0) == 0  # the compensation has no outcome yet


def test_reconcile_records_a_success_the_hook_missed_only_when_asked_to():
    from celery import current_app

    run = order_saga().start(order_id=42)
    current_app.backend.store_result(f"saga-{run.pk}-0-step", {"reservation_id": "r1"}, "SUCCESS")
    assert sagas.reconcile(older_than_seconds=0, check_results=False) == 0  # what workers do
    assert step(run, 0).status == "running"
    assert sagas.reconcile(older_than_seconds=0) == 1  # manage.py saga reconcile
    run = refresh(run)
    assert run.context["reservation_id"] == "r1" and published()[-1][0] == f"saga-{run.pk}-1-step"


def test_dead_letter_compensate_of_a_skipped_optional_steps_letter_does_not_undo_the_run():
    saga = Saga("with_optional", steps=[Step(RESERVE, compensate=RELEASE),
                                        Step(CHARGE, optional=True)])
    run = saga.start(order_id=42)
    succeed(run, 0, {})
    park(run, 1)
    assert refresh(run).status == "succeeded"
    letter = DeadLetter.objects.get(task_id=f"saga-{run.pk}-1-step")
    with pytest.raises(replay.ReplayError, match="is not the failure saga with_optional run"):
        replay.compensate(letter)
    assert refresh(run).status == "succeeded" and letter.status == "parked"
