"""Effects that happen once: the proof, its key, its generations and its retention."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import shared_task
from django.utils import timezone

from recovery import RecoveryTask
from recovery.core import headers as hdr
from recovery.models import DeadLetter, DeadLetterEvent, Effect
from recovery.operations.effects_rerun import mark_all_effects_rerun, mark_effects_rerun
from recovery.operations.replay_options import replay_options
from recovery.store.effects import effect_once, idempotency_key, next_generation, purge_effects
from recovery.store.retention import plan, purge

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    pass


def test_the_first_run_records_its_effect_and_the_next_skips_it():
    with effect_once("t1", "charge") as first:
        assert first is True
    with effect_once("t1", "charge") as first:
        assert first is False
    with effect_once("t1", "email") as first:
        assert first is True
    assert Effect.objects.filter(task_id="t1").count() == 2


def test_an_exception_inside_rolls_back_the_effect_and_its_proof_so_the_retry_runs_it():
    with pytest.raises(Boom):
        with effect_once("t2", "charge") as first:
            assert first
            DeadLetterEvent.objects.none()  # the effect's own writes would go here
            raise Boom
    assert not Effect.objects.filter(task_id="t2").exists()
    with effect_once("t2", "charge") as first:
        assert first is True


def test_a_new_generation_runs_an_effect_again_and_keeps_the_old_proof():
    with effect_once("t3", "charge"):
        pass
    assert next_generation("t3") == 1
    with effect_once("t3", "charge", generation=1) as first:
        assert first is True
    assert next_generation("t3") == 2
    assert next_generation("unknown") == 0


@pytest.mark.parametrize("name", ["", "x" * 201, None])
def test_an_effect_needs_a_name_the_column_holds(name):
    with pytest.raises(ValueError, match="effect's name"):
        with effect_once("t4", name):
            pass


def test_idempotency_keys_are_stable_per_task_effect_and_generation():
    key = idempotency_key("t5", "charge")
    assert key == idempotency_key("t5", "charge")
    assert len({key, idempotency_key("t6", "charge"), idempotency_key("t5", "refund"),
                idempotency_key("t5", "charge", 1)}) == 4
    assert "t5" not in key


@shared_task(base=RecoveryTask, bind=True, name="tests.effects.probe")
def probe(self, name: str) -> tuple[bool, str]:
    with self.effect(name) as first:
        return first, self.idempotency_key(name)


def test_the_task_api_keys_effects_by_task_id_and_refuses_a_forged_generation():
    first = probe.apply(args=("charge",), task_id="task-a").get()
    again = probe.apply(args=("charge",), task_id="task-a").get()
    other = probe.apply(args=("charge",), task_id="task-b").get()
    assert first[0] is True and again[0] is False and other[0] is True
    assert first[1] == again[1] != other[1]
    rerun = probe.apply(args=("charge",), task_id="task-a",
                        headers={hdr.EFFECTS_GENERATION: 1}).get()
    assert rerun == (True, idempotency_key("task-a", "charge", 1))
    for forged in ("-1", "two", -3):
        result = probe.apply(args=("charge",), task_id="task-c",
                             headers={hdr.EFFECTS_GENERATION: forged})
        with pytest.raises(ValueError, match="is not a generation"):
            result.get()
    assert not Effect.objects.filter(task_id="task-c").exists()


def test_calling_the_task_as_a_function_says_effects_need_a_task_id():
    with pytest.raises(RuntimeError, match="effects need a task id"):
        probe("charge")


def _letter(task_id: str, status: str = DeadLetter.Status.PARKED) -> DeadLetter:
    return DeadLetter.objects.create(task_id=task_id, task_name="tests.effects.probe",
                                     status=status, headers={"headers": {"x": 1}})


def test_marking_a_letter_gives_its_next_replay_a_new_generation_audited():
    letter = _letter("task-d")
    with effect_once("task-d", "charge"):
        pass
    assert mark_effects_rerun(letter, actor="alice", note="refunded by hand") == 1
    letter.refresh_from_db()
    assert letter.headers["headers"] == {"x": 1, hdr.EFFECTS_GENERATION: 1}
    _, headers = replay_options(letter.headers, "", None)
    assert headers == {hdr.EFFECTS_GENERATION: 1}
    event = letter.events.get(action=DeadLetterEvent.Action.EFFECTS_RERUN)
    assert (event.actor, event.note, event.after) == ("alice", "refunded by hand",
                                                      {"effects_generation": 1})


def test_only_parked_letters_are_marked_in_bulk():
    _letter("task-e")
    _letter("task-f", DeadLetter.Status.RESOLVED)
    assert mark_all_effects_rerun(DeadLetter.objects.all(), actor="cli:bob") == 1
    assert DeadLetterEvent.objects.filter(action=DeadLetterEvent.Action.EFFECTS_RERUN).count() == 1


@pytest.mark.parametrize("stored", [{"headers": {hdr.EFFECTS_GENERATION: 0}},
                                    {"headers": {hdr.EFFECTS_GENERATION: "3"}},
                                    {"headers": {hdr.EFFECTS_GENERATION: True}},
                                    {hdr.EFFECTS_GENERATION: -1}])
def test_a_replay_carries_no_generation_it_did_not_set(stored):
    assert replay_options(stored, "", None)[1] == {}


def test_old_proofs_are_purged_with_the_letters_but_those_a_replay_may_still_need(settings):
    settings.RECOVERY = {**settings.RECOVERY, "EFFECTS_RETENTION_DAYS": 10}
    old = timezone.now() - timedelta(days=11)
    for task_id in ("done", "parked", "replaying", "fresh"):
        Effect.objects.create(task_id=task_id, name="charge",
                              created_at=old if task_id != "fresh" else timezone.now())
    _letter("parked")
    _letter("replaying", DeadLetter.Status.REPLAYING)
    purge(plan(status=DeadLetter.Status.RESOLVED))
    assert set(Effect.objects.values_list("task_id", flat=True)) == {"parked", "replaying", "fresh"}
    assert purge_effects(timezone.now()) == 1


def test_a_saga_step_keys_its_effects_by_its_step_so_a_resumed_step_skips_them(monkeypatch):
    # (no saga run behind these messages: let them through as current steps)
    monkeypatch.setattr("recovery.task.is_current", lambda *args, **kwargs: True)
    step = {hdr.SAGA: {"run": 7, "step": 1, "role": "step"}}
    first = probe.apply(args=("reserve",), task_id="step-run-1", headers=step).get()
    resumed = probe.apply(args=("reserve",), task_id="step-run-2", headers=step).get()
    compensation = probe.apply(args=("reserve",), task_id="comp-1",
                               headers={hdr.SAGA: {"run": 7, "step": 1,
                                                   "role": "compensation"}}).get()
    assert first[0] is True and resumed[0] is False and compensation[0] is True
    assert first[1] == resumed[1] != compensation[1]
    assert set(Effect.objects.values_list("task_id", flat=True)) == {"7:1", "7:1:compensation"}
