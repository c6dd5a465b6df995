"""The operations service on real PostgreSQL and a real Redis broker."""

from __future__ import annotations

import json

import pytest

from config.celery import app
from recovery.core.redaction import MASK
from recovery.operations import replay as service
from recovery.models import DeadLetter, DeadLetterEvent

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"  # charge_payment(self, order_id, amount_cents)



def make_letter(n: int = 1, **overrides) -> DeadLetter:
    values = dict(task_id=f"task-{n}", task_name=TASK, args=[n, 500], kwargs={},
                  headers={"chain": [{"task": "tasks.tasks.fetch_exchange_rate", "args": ["EUR"],
                                      "kwargs": {}, "options": {}, "subtask_type": None,
                                      "immutable": True}],
                           "eta": "2026-01-01T00:00:00", "expires": "2026-01-02T00:00:00"},
                  kind="dependency", fingerprint="f" * 40, queue="celery",
                  exception_type="recovery.errors.DependencyError", exception_message="declined")
    values.update(overrides)
    return DeadLetter.objects.create(**values)


def published(broker, queue: str = "celery") -> list[dict]:
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def test_replay_republishes_under_the_same_id_without_stored_workflow_options_and_audits(broker):
    letter = make_letter()
    service.replay(letter, actor="alice", note="card limit raised")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.REPLAYING
    assert letter.replay_count == 1
    [message] = published(broker)
    headers = message["headers"]
    assert headers["id"] == "task-1" and headers["task"] == TASK
    assert headers["recovery_replay"] == 1
    assert headers["eta"] is None and headers["expires"] is None
    body = json.loads(message["body"]) if isinstance(message["body"], str) and \
        message.get("properties", {}).get("body_encoding") != "base64" else None
    if body is None:
        import base64
        body = json.loads(base64.b64decode(message["body"]))
    args, kwargs, embed = body
    assert args == [1, 500]
    # A stored chain is input any client could forge: a replay never carries it
    # (tests/security/test_replay_options.py).
    assert embed["chain"] is None and embed["callbacks"] is None and embed["errbacks"] is None
    [event] = letter.events.all()
    assert (event.action, event.actor, event.note) == ("replayed", "alice", "card limit raised")


def test_replay_of_a_letter_that_is_not_parked_changes_nothing(broker):
    letter = make_letter(status=DeadLetter.Status.RESOLVED)
    with pytest.raises(service.ReplayError, match="only parked letters can be replayed"):
        service.replay(letter, actor="alice")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RESOLVED and letter.replay_count == 0
    assert published(broker) == [] and not DeadLetterEvent.objects.exists()


def test_replay_of_an_unregistered_task_says_so_and_changes_nothing(broker):
    letter = make_letter(task_name="billing.tasks.gone")
    with pytest.raises(service.ReplayError, match="'billing.tasks.gone' is not registered"):
        service.replay(letter, actor="alice")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and published(broker) == []


@pytest.mark.parametrize("args, kwargs, message", [
    ({"order": 1}, {}, "args must be a JSON list"),
    ([1, 2], [], "kwargs must be a JSON object"),
    ([1], {}, "arguments do not fit"),
    ([1, 2, 3], {}, "arguments do not fit"),
    ([1], {"amount_cents": 5, "surprise": True}, "arguments do not fit"),
])
def test_an_edited_payload_that_does_not_fit_the_task_is_refused(broker, args, kwargs, message):
    letter = make_letter()
    with pytest.raises(service.PayloadError, match=message):
        service.replay(letter, actor="alice", args=args, kwargs=kwargs)
    letter.refresh_from_db()
    assert letter.args == [1, 500] and letter.status == DeadLetter.Status.PARKED
    assert published(broker) == [] and not DeadLetterEvent.objects.exists()


def test_an_edited_payload_is_saved_audited_and_replayed(broker):
    letter = make_letter()
    service.replay(letter, actor="alice", args=[1], kwargs={"amount_cents": 90})
    letter.refresh_from_db()
    assert (letter.args, letter.kwargs) == ([1], {"amount_cents": 90})
    edit = letter.events.get(action="edited")
    assert edit.before == {"args": [1, 500], "kwargs": {}}
    assert edit.after == {"args": [1], "kwargs": {"amount_cents": 90}}
    assert len(published(broker)) == 1


@pytest.mark.parametrize("operation, status", [(service.discard, "discarded"),
                                               (service.resolve, "resolved")])
def test_discard_and_resolve_close_a_parked_letter_once(broker, operation, status):
    letter = make_letter()
    operation(letter, actor="bob", note="duplicate order")
    letter.refresh_from_db()
    assert letter.status == status
    assert letter.events.get().action == status
    with pytest.raises(service.ReplayError, match="only parked letters"):
        operation(letter, actor="bob")


def test_bulk_discard_streams_in_batches_and_leaves_other_letters_alone(broker):
    DeadLetter.objects.bulk_create([
        DeadLetter(task_id=f"t-{i}", task_name=TASK, fingerprint="a" * 40,
                   kind="data_integrity" if i % 2 else "dependency")
        for i in range(1200)
    ])
    seen = []
    result = service.bulk("discard", DeadLetter.objects.filter(kind="dependency"), actor="bob",
                          batch_size=250, progress=lambda r: seen.append(r.done))
    assert result.done == 600 and result.ok
    assert seen == [250, 500, 600]
    assert DeadLetter.objects.filter(status="discarded").count() == 600
    assert DeadLetter.objects.filter(status="parked", kind="data_integrity").count() == 600
    assert service.bulk("discard", DeadLetter.objects.all(), actor="bob",
                        batch_size=250).done == 600  # only the rest: nothing twice


def test_bulk_replay_counts_unregistered_tasks_as_failures_and_replays_the_rest(broker):
    make_letter(1)
    make_letter(2, task_name="billing.tasks.gone")
    make_letter(3)
    result = service.bulk("replay", DeadLetter.objects.all(), actor="bob", rate=50)
    assert (result.done, result.failed) == (2, 1)
    assert "not registered" in result.errors[0]
    assert len(published(broker)) == 2
    assert DeadLetter.objects.get(task_id="task-2").status == DeadLetter.Status.PARKED


def _interrupt_the_third_publish(monkeypatch):
    real_publish = service._publish_replay
    calls = []

    def publish_then_interrupt(letter, **kwargs):
        calls.append(letter.pk)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the operator pressed Ctrl-C mid-batch
        return real_publish(letter, **kwargs)

    monkeypatch.setattr(service, "_publish_replay", publish_then_interrupt)
    return real_publish


def test_an_interrupted_bulk_replay_sends_nothing_of_the_batch_it_was_buffering(broker,
                                                                                monkeypatch):
    # Given five letters replayed in one batch, buffered for one round trip to Redis
    for n in range(1, 6):
        make_letter(n)
    real_publish = _interrupt_the_third_publish(monkeypatch)
    # When the operator interrupts while the batch is being buffered
    with pytest.raises(KeyboardInterrupt):
        service.bulk("replay", DeadLetter.objects.all(), actor="bob", batch_size=10)
    # Then none of it was sent, and every letter is parked as before
    assert len(published(broker)) == 0
    assert DeadLetter.objects.filter(status="parked", replay_count=0).count() == 5
    assert not DeadLetterEvent.objects.filter(action="replayed").exists()
    # Running it again finishes the job.
    monkeypatch.setattr(service, "_publish_replay", real_publish)
    assert service.bulk("replay", DeadLetter.objects.all(), actor="bob").done == 5
    assert len(published(broker)) == 5


def test_an_interrupted_throttled_replay_puts_unpublished_letters_back_to_parked(broker,
                                                                                monkeypatch):
    # A throttled replay publishes letter by letter: what went out stays replaying.
    for n in range(1, 6):
        make_letter(n)
    real_publish = _interrupt_the_third_publish(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        service.bulk("replay", DeadLetter.objects.all(), actor="bob", batch_size=10,
                     rate=1000)
    assert len(published(broker)) == 2
    assert DeadLetter.objects.filter(status="replaying", replay_count=1).count() == 2
    assert DeadLetter.objects.filter(status="parked", replay_count=0).count() == 3
    monkeypatch.setattr(service, "_publish_replay", real_publish)
    assert service.bulk("replay", DeadLetter.objects.all(), actor="bob").done == 3
    assert len(published(broker)) == 5


def test_a_batch_the_broker_fails_to_take_stays_replaying_with_an_uncertain_event(
        broker, monkeypatch):
    # Given three letters replayed in one batch
    for n in range(1, 4):
        make_letter(n)
    # When Redis fails while the batch's pipeline is sent (some messages may be in)
    from kombu.transport.redis import PublishBatch

    def fail(self):
        raise ConnectionError("Redis went away mid-pipeline")

    monkeypatch.setattr(PublishBatch, "flush", fail)
    result = service.bulk("replay", DeadLetter.objects.all(), actor="bob", batch_size=10)
    # Then nothing is called published nor parked again: they stay replaying (a run
    # resolves its letter, the watchdog parks the rest), and each says so in its history
    assert (result.done, result.failed) == (0, 3)
    assert all("publish uncertain" in error for error in result.errors)
    assert DeadLetter.objects.filter(status="replaying", replay_count=1).count() == 3
    outcomes = list(DeadLetterEvent.objects.filter(action="replayed")
                    .values_list("outcome", flat=True))
    assert len(outcomes) == 3
    assert all("publish uncertain" in outcome and "Redis went away" in outcome
               for outcome in outcomes)


# -- letters imported from a masked export ----------------------------------------------------


def test_a_payload_holding_the_mask_is_never_replayed_as_it_is(broker):
    # Given a letter imported from a masked export: the mask stands where a secret was
    letter = make_letter(args=[1, MASK])
    # When it is replayed as stored, alone or in bulk
    with pytest.raises(service.ReplayError, match="its payload holds masked values"):
        service.replay(letter, actor="alice")
    result = service.bulk("replay", DeadLetter.objects.all(), actor="alice")
    # Then nothing is published and the letter stays parked
    assert (result.done, result.failed) == (0, 1)
    assert "its payload holds masked values" in result.errors[0]
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and published(broker) == []


def test_an_edited_payload_with_the_real_values_replays_an_imported_letter(broker):
    letter = make_letter(kwargs={}, args=[1, MASK])
    with pytest.raises(service.PayloadError, match="still holds masked values"):
        service.replay(letter, actor="alice", args=[MASK, 500])
    service.replay(letter, actor="alice", args=[1, 500])
    [message] = published(broker)
    assert message["headers"]["id"] == "task-1"
    assert DeadLetter.objects.get().args == [1, 500]


def test_a_payload_holding_the_mask_is_never_compensated(broker):
    letter = make_letter(args=[1, f"card {MASK}"])
    with pytest.raises(service.ReplayError, match="cannot compensate letter .* masked values"):
        service.compensate(letter, actor="alice")
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and published(broker) == []
