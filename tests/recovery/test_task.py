"""RecoveryTask pieces that need no worker: class creation, policy precedence, backend writes."""

from __future__ import annotations

import traceback

import pytest
from celery import Celery, states
from celery.exceptions import Retry
from celery.app.task import Context
from django.db import OperationalError
from django_celery_results.models import TaskResult
from kombu.exceptions import EncodeError

from recovery import RecoveryTask, RetryPolicy
from recovery.core import headers as hdr
from recovery.operations import replay
from recovery.models import DeadLetter
from recovery.store.parking import drain_spool
from tests.integration import worker_tasks
from recovery.task import _ParkAwareBackend, exception_path


def test_project_wide_task_cls_makes_every_task_a_recovery_task():
    app = Celery("unit", task_cls="recovery.task:RecoveryTask", set_as_current=False)

    @app.task
    def plain():
        return 1

    assert isinstance(plain, RecoveryTask)
    assert plain.acks_late is True and plain.reject_on_worker_lost is True
    assert plain.max_retries is None


def test_policy_given_as_a_dict_is_validated_at_class_creation():
    app = Celery("unit", set_as_current=False)

    @app.task(base=RecoveryTask, retry_policy={"max_attempts": 2})
    def with_dict():
        return 1

    assert with_dict.retry_policy == RetryPolicy(max_attempts=2)
    # Celery builds task classes when the app is finalized (worker start-up): the
    # bad policy fails there, before any message is consumed.
    @app.task(base=RecoveryTask, retry_policy={"max_attempts": 0})
    def broken():
        return 1

    with pytest.raises(ValueError, match="max_attempts must be an integer >= 1"):
        broken.name  # noqa: B018 - evaluating the proxy creates the class

    @app.task(base=RecoveryTask, retry_policy=3)
    def wrong_type():
        return 1

    with pytest.raises(TypeError, match="must be a recovery.RetryPolicy or a dict"):
        wrong_type.name  # noqa: B018


def test_max_retries_on_a_recovery_task_is_ignored_for_the_policy():
    app = Celery("unit", set_as_current=False)

    @app.task(base=RecoveryTask, max_retries=1, retry_policy=RetryPolicy(max_attempts=7))
    def capped():
        return 1

    assert capped.max_retries is None
    assert capped.retry_policy.max_attempts == 7


def test_task_without_policy_uses_the_settings_default(settings):
    app = Celery("unit", set_as_current=False)

    @app.task(base=RecoveryTask, bind=True)
    def defaulted(self):
        return 1

    settings.RECOVERY = {**settings.RECOVERY, "DEFAULT_POLICY": {"max_attempts": 9}}
    assert defaulted.effective_policy().max_attempts == 9


def test_exception_path_is_dotted_except_for_builtins():
    assert exception_path(ValueError("x")) == "ValueError"
    assert exception_path(_ParkAwareBackend) == "recovery.task._ParkAwareBackend"


def test_recovery_exceptions_keep_their_0_1_path_so_failure_groups_carry_on():
    """A letter's exception_type feeds its fingerprint; the move into recovery.core must
    not split an existing failure group (or its open incident) in two."""
    from recovery.core.errors import PermanentError
    from recovery.workflows.circuit import CircuitOpenError

    assert exception_path(PermanentError("x")) == "recovery.errors.PermanentError"
    assert exception_path(CircuitOpenError) == "recovery.circuit.CircuitOpenError"


@pytest.mark.django_db
@pytest.mark.parametrize("store_retry_state, expected_rows", [(False, 0), (True, 1)])
def test_retry_state_is_stored_only_when_asked(settings, store_retry_state, expected_rows):
    from config.celery import app

    settings.RECOVERY = {**settings.RECOVERY, "STORE_RETRY_STATE": store_retry_state}
    backend = _ParkAwareBackend(app.backend)
    backend.mark_as_retry("retry-task-id", ValueError("again"), traceback="tb")
    rows = TaskResult.objects.filter(task_id="retry-task-id")
    assert rows.count() == expected_rows
    if expected_rows:
        assert rows.get().status == states.RETRY


@pytest.mark.django_db
def test_eager_apply_retries_through_the_policy_and_parks(settings):
    """Projects that test with task_always_eager / .apply() get the same lifecycle, without sleeping."""
    from recovery.core.errors import DependencyError, PermanentError
    from recovery.models import DeadLetter

    app = Celery("eager", set_as_current=False)
    app.conf.task_always_eager = True
    calls: list[int] = []

    @app.task(base=RecoveryTask, bind=True, retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=5))
    def flaky(self):
        calls.append(len(self.attempt_history))
        if len(calls) < 3:
            raise DependencyError("503")
        return "ok"

    @app.task(base=RecoveryTask, bind=True)
    def doomed(self):
        raise PermanentError("bad input")

    assert flaky.apply().get() == "ok"
    assert calls == [0, 1, 2]  # the history header travels with each eager retry
    result = doomed.apply()
    assert result.failed()
    letter = DeadLetter.objects.get(task_id=result.id)
    assert letter.attempts == 1 and letter.permanent


# -- bookkeeping after a body that returned (the worker-side proof: test_worker_failures.py) --


def _refusing(*args, **kwargs):
    raise OperationalError("server closed the connection unexpectedly")


@pytest.mark.django_db(transaction=True)  # a refused write discards the connection
def test_a_success_result_the_database_refuses_is_spooled_and_stored_by_the_drain(monkeypatch):
    from config.celery import app

    backend = _ParkAwareBackend(app.backend)
    monkeypatch.setattr(app.backend, "_store_result", _refusing)

    backend.mark_as_done("paid-ok", {"charged": 42}, request=Context(task="billing.charge"))

    assert not TaskResult.objects.filter(task_id="paid-ok").exists()
    monkeypatch.undo()  # the database is back
    assert drain_spool(backend=app.backend) == 1
    assert TaskResult.objects.get(task_id="paid-ok").status == states.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_a_success_result_neither_the_database_nor_the_spool_keeps_is_lost_loudly_not_raised(
        monkeypatch, settings, tmp_path, caplog):
    from config.celery import app

    (tmp_path / "a-file").write_text("")
    settings.RECOVERY = {**settings.RECOVERY, "SPOOL_DIR": str(tmp_path / "a-file" / "spool")}
    monkeypatch.setattr(app.backend, "_store_result", _refusing)

    _ParkAwareBackend(app.backend).mark_as_done("paid-lost", 1, request=Context())

    assert "the result is lost, the task is not run again" in caplog.text
    assert any(r.levelname == "CRITICAL" for r in caplog.records)


@pytest.mark.django_db
def test_a_result_the_serializer_cannot_encode_still_fails_as_celery_records_it():
    from config.celery import app

    with pytest.raises(EncodeError):
        _ParkAwareBackend(app.backend).mark_as_done("a-set", {1, 2}, request=Context())


@pytest.mark.django_db(transaction=True)
def test_a_replay_that_succeeds_while_the_database_is_down_resolves_its_letter_later(
        monkeypatch):
    letter = DeadLetter.objects.create(task_id="replayed-ok", task_name="t",
                                       status=DeadLetter.Status.REPLAYING)
    task = worker_tasks.add_one
    monkeypatch.setattr(replay, "mark_replay_succeeded", _refusing)
    task.push_request(id="replayed-ok", headers={hdr.REPLAY: 1})
    try:
        task.on_success(2, "replayed-ok", (1,), {})  # does not raise
    finally:
        task.pop_request()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.REPLAYING

    monkeypatch.undo()
    assert drain_spool() == 1
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RESOLVED


def test_a_retry_leaves_the_task_without_recovery_frames_and_keeps_the_task_exception(
        monkeypatch):
    # Celery formats a Retry's traceback on every retry: the frames that published it are
    # recovery's own and cost more to format than the publish (bench/README.md).
    app = Celery("unit", set_as_current=False)

    @app.task(base=RecoveryTask, bind=True, retry_policy=RetryPolicy(
        max_attempts=3, initial_delay_seconds=0, max_delay_seconds=0, jitter="none"))
    def flaky(self, i):
        raise ValueError(f"first run of {i} fails")

    def published(self, exc, delay, args, kwargs, headers, options):
        raise Retry(exc=exc, when=delay)

    monkeypatch.setattr(RecoveryTask, "_send_again", published)
    flaky.push_request(id="retry-frames", called_directly=False, is_eager=False,
                       delivery_info={"routing_key": "celery"}, args=[1], kwargs={})
    try:
        with pytest.raises(Retry) as raised:
            flaky(1)
    finally:
        flaky.pop_request()

    frames = [entry.name for entry in traceback.extract_tb(raised.value.__traceback__)]
    assert not {"_recover", "_schedule_retry", "published"} & set(frames)
    assert isinstance(raised.value.exc, ValueError)
    context = raised.value.__context__
    assert context is raised.value.exc
    assert "flaky" in [entry.name for entry in traceback.extract_tb(context.__traceback__)]
