"""``manage.py dlq export --to kafka://`` and ``manage.py dlq import --from FILE|kafka://``
against real PostgreSQL; Kafka is faked at the client boundary (tests/kafka_fakes.py)
except where the real client can run without a broker."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from recovery.core.redaction import MASK
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.store import importing, kafka
from tests.kafka_fakes import FakeConsumer, FakeError, FakeMessage, FakeProducer, as_topic

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"
TOPIC = "kafka://kafka-1:9092/payments.DLT"
SECRETS = ("tok_live_4242", "hunter2", "sk_live_abc", "at_secret", "old_pw")


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("dlq", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def letters():
    """Letters with secrets everywhere, an audit trail, a poison body and a saga step."""
    card = DeadLetter.objects.create(
        task_id="card-1", task_name="billing.tasks.charge_card", args=[7, "tok_live_4242"],
        kwargs={"api_token": "at_secret"}, fingerprint="e" * 40, queue="payments",
        headers={"headers": {"authorization": "Bearer sk_live_abc"}},
        exception_message="token tok_live_4242 declined", attempts=3, kind="dependency")
    DeadLetterEvent.objects.create(letter=card, action="edited", actor="alice",
                                   before={"args": [7, "old_pw"], "kwargs": {}},
                                   after={"args": [7, "tok_live_4242"], "kwargs": {}})
    DeadLetter.objects.create(
        task_id="row-1", task_name="tasks.tasks.import_customer_row", status="resolved",
        args=[{"id": 3, "password": "hunter2"}], fingerprint="f" * 40, kind="data_integrity")
    DeadLetter.objects.create(
        task_id="poison-1", task_name="unknown.task", kind="poison", fingerprint="0" * 40,
        raw_body='[[1], {"card_token": "tok_live_4242"}, {}]',
        content_type="application/json")
    DeadLetter.objects.create(
        task_id="saga-4-1-step", task_name=TASK, args=[4, 100], fingerprint="1" * 40,
        status="replaying", headers={"headers": {"recovery_saga": {"run": 4, "step": 1,
                                                                    "role": "step"}}})


@pytest.fixture
def producer(monkeypatch):
    made = FakeProducer()
    monkeypatch.setattr(kafka, "make_producer", lambda url, timeout_seconds: made)
    return made


def serve(monkeypatch, consumer: FakeConsumer) -> list[str]:
    groups: list[str] = []

    def make_consumer(url, group_id):
        groups.append(group_id)
        return consumer

    monkeypatch.setattr(kafka, "make_consumer", make_consumer)
    return groups


def snapshot() -> list[dict]:
    """The letters as an import leaves them: their importable fields, and which audit
    actions they have (the note names the source, which differs by design)."""
    return [{"task_id": letter.task_id,
             **{name: getattr(letter, name) for name in importing.IMPORTED},
             "events": [(e.action, e.actor, e.outcome.split()[0])
                        for e in letter.events.order_by("pk")]}
            for letter in DeadLetter.objects.order_by("task_id")]


# -- export --to ------------------------------------------------------------------------------


def test_export_to_kafka_sends_each_letter_masked_and_keyed_by_task_id(letters, producer):
    out, err = run("export", "--to", TOPIC)
    assert out == ""
    assert "Exported 4 letters to kafka://kafka-1:9092/payments.DLT (secrets masked)." in err
    assert [r.key for r in producer.produced] == [b"card-1", b"row-1", b"poison-1",
                                                  b"saga-4-1-step"]
    for record in producer.produced:
        assert record.topic == "payments.DLT"
        everything = record.value + b"".join(v for _, v in record.headers)
        for secret in SECRETS:
            assert secret.encode() not in everything


def test_export_to_kafka_takes_the_file_exports_filters(letters, producer):
    run("export", "--to", TOPIC, "--status", "parked", "--kind", "dependency", "--no-events")
    [record] = producer.produced
    assert record.key == b"card-1" and "events" not in json.loads(record.value)
    producer.produced.clear()
    run("export", "--to", TOPIC, "--limit", "2")
    assert [r.key for r in producer.produced] == [b"card-1", b"row-1"]


def test_a_failed_delivery_exits_non_zero_naming_how_many_were_sent(letters, monkeypatch):
    failing = FakeProducer(fail=lambda key: FakeError(-192, "Local: Message timed out")
                           if key in (b"row-1", b"poison-1") else None)
    monkeypatch.setattr(kafka, "make_producer", lambda url, timeout_seconds: failing)
    with pytest.raises(CommandError, match=r"^2 of 4 letters delivered to kafka://kafka-1:9092/"
                                           r"payments.DLT; 2 failed \(row-1: Local: Message "
                                           r"timed out; poison-1: ") as caught:
        run("export", "--to", TOPIC)
    assert caught.value.returncode == 1


@pytest.mark.parametrize("args, error", [
    (("--reveal",), "--reveal writes to files only"),
    (("--format", "csv"), "leave out --format csv"),
    (("--output", "x.jsonl"), "not allowed with argument"),
])
def test_export_to_kafka_refuses_what_it_cannot_do_and_sends_nothing(letters, producer, args,
                                                                     error):
    with pytest.raises(CommandError, match=error):
        run("export", "--to", TOPIC, *args)
    assert producer.produced == []
    assert not DeadLetterEvent.objects.filter(action="revealed").exists()


@pytest.mark.parametrize("url, error", [
    ("kafka://kafka-1:9092", "names no topic"),
    ("kafka://ops:secret@kafka-1/t", "RECOVERY_KAFKA_SASL_USERNAME"),
    ("kafka://kafka-1/t?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-256",
     "needs a user name and password"),
])
def test_a_bad_kafka_url_is_a_clear_error_before_anything_is_sent_or_read(letters, producer,
                                                                         url, error):
    with pytest.raises(CommandError, match=f"{error}.*; nothing was sent or read"):
        run("export", "--to", url)
    with pytest.raises(CommandError, match=f"{error}.*; nothing was sent or read"):
        run("import", "--from", url)
    assert producer.produced == []


def test_credentials_come_from_the_environment(letters, monkeypatch):
    configs = []
    monkeypatch.setattr(kafka, "make_producer", lambda url, timeout_seconds: configs.append(
        kafka.producer_config(url, timeout_seconds=timeout_seconds)) or FakeProducer())
    monkeypatch.setenv("RECOVERY_KAFKA_SASL_USERNAME", "svc-dlq")
    monkeypatch.setenv("RECOVERY_KAFKA_SASL_PASSWORD", "s3cret")
    run("export", "--to", "kafka://kafka-1/t?security.protocol=SASL_SSL&sasl.mechanism=PLAIN",
        "--timeout", "10")
    [config] = configs
    assert (config["sasl.username"], config["sasl.password"]) == ("svc-dlq", "s3cret")
    assert (config["enable.idempotence"], config["acks"], config["message.timeout.ms"]) == (
        True, "all", 10_000)


def test_without_confluent_kafka_the_command_says_how_to_install_it(letters, monkeypatch):
    def missing():
        raise kafka.KafkaUnavailable("confluent-kafka is not installed; install it with `pip "
                                     "install 'celery-recovery[kafka]'`")

    monkeypatch.setattr(kafka, "_confluent", missing)
    with pytest.raises(CommandError, match=r"pip install 'celery-recovery\[kafka\]'"):
        run("export", "--to", TOPIC)
    with pytest.raises(CommandError, match=r"pip install 'celery-recovery\[kafka\]'"):
        run("import", "--from", TOPIC)


# -- import --from kafka:// -------------------------------------------------------------------


def test_import_from_kafka_upserts_and_a_second_run_changes_nothing(letters, producer,
                                                                   monkeypatch):
    run("export", "--to", TOPIC)
    DeadLetter.objects.all().delete()
    topic = as_topic(producer.produced)
    groups = serve(monkeypatch, FakeConsumer(topic))
    out, err = run("import", "--from", TOPIC, "--timeout", "0.2")
    assert out == ("Imported 4 records read from kafka://kafka-1:9092/payments.DLT: 4 created, "
                   "0 updated, 0 unchanged, 0 kept as they are, 0 skipped as malformed.\n")
    first = snapshot()
    serve(monkeypatch, FakeConsumer(topic))
    out, _ = run("import", "--from", TOPIC, "--timeout", "0.2", "--group-id", "restore")
    assert "0 created, 0 updated, 4 unchanged" in out
    assert snapshot() == first
    assert groups[0].startswith("celery-recovery-import-")


def test_import_from_kafka_with_malformed_records_imports_the_rest_and_exits_non_zero(
        letters, producer, monkeypatch):
    run("export", "--to", TOPIC)
    DeadLetter.objects.all().delete()
    topic = as_topic(producer.produced, partitions=1)
    topic.insert(1, FakeMessage(partition_=0, offset_=99, key_=b"x", value_=b"{oops"))
    serve(monkeypatch, FakeConsumer(topic, partitions=(0,)))
    with pytest.raises(CommandError, match=r"^1 record\(s\) could not be imported$") as caught:
        run("import", "--from", TOPIC, "--timeout", "0.2")
    assert caught.value.returncode == 1
    assert DeadLetter.objects.count() == 4


def test_an_import_that_stops_before_the_end_exits_non_zero_saying_why(monkeypatch):
    serve(monkeypatch, FakeConsumer([], eof=False))
    with pytest.raises(CommandError, match=r"^nothing arrived for 0.1s before the end of "
                                           r"partitions 0, 1$"):
        run("import", "--from", TOPIC, "--timeout", "0.1")


def test_an_unknown_topic_is_a_clear_error(monkeypatch):
    serve(monkeypatch, FakeConsumer([FakeMessage(error_=FakeError(
        3, "Subscribed topic not available: payments.DLT: Broker: Unknown topic or partition"))]))
    with pytest.raises(CommandError, match="cannot read kafka://kafka-1:9092/payments.DLT: "
                                           "Subscribed topic not available"):
        run("import", "--from", TOPIC)


def test_the_real_client_with_no_broker_stops_after_the_timeout_and_says_so():
    # Given the real confluent-kafka consumer (through recovery's adapter) and no broker
    pytest.importorskip("confluent_kafka")
    # When the import hears nothing for a second
    with pytest.raises(CommandError, match=r"no partition of kafka://127.0.0.1:1/letters.DLT "
                                           r"was assigned within 1s: is a broker reachable\?"):
        run("import", "--from", "kafka://127.0.0.1:1/letters.DLT", "--timeout", "1")
    # Then nothing was written
    assert not DeadLetter.objects.exists()


def test_settings_the_real_client_refuses_are_a_clear_error(letters, tmp_path):
    pytest.importorskip("confluent_kafka")
    url = f"kafka://127.0.0.1:1/t?security.protocol=SSL&ssl.ca.location={tmp_path}/none.pem"
    with pytest.raises(CommandError, match=r"^kafka://127.0.0.1:1/t: Failed to create producer: "
                                           r"ssl.ca.location failed"):
        run("export", "--to", url)
    with pytest.raises(CommandError, match=r"^kafka://127.0.0.1:1/t: Failed to create consumer: "
                                           r"ssl.ca.location failed"):
        run("import", "--from", url)


# -- import --from FILE -----------------------------------------------------------------------


def test_import_from_a_file_export_and_from_standard_input(letters, tmp_path, monkeypatch):
    path = tmp_path / "letters.jsonl"
    run("export", "-o", str(path))
    DeadLetter.objects.all().delete()
    out, _ = run("import", "--from", str(path))
    assert out == (f"Imported from {path}: 4 created, 0 updated, 0 unchanged, 0 kept as they "
                   f"are, 0 skipped as malformed.\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
    out, _ = run("import", "--from", "-")
    assert "4 unchanged" in out
    assert DeadLetterEvent.objects.filter(action="imported",
                                          note__startswith=f"from {path}, line ").count() == 4


@pytest.mark.parametrize("args, error", [
    (("--batch-size", "0"), "must be at least 1"),
    (("--max-messages", "0"), "must be at least 1"),
    (("--timeout", "0"), "must be more than 0 seconds"),
])
def test_import_options_out_of_range_are_refused(args, error):
    with pytest.raises(CommandError, match=f"{error}; nothing was read"):
        run("import", "--from", TOPIC, *args)


def test_a_csv_or_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CommandError, match="a CSV export cannot be imported"):
        run("import", "--from", str(tmp_path / "letters.csv"))
    with pytest.raises(CommandError, match="cannot read .*gone.jsonl: No such file"):
        run("import", "--from", str(tmp_path / "gone.jsonl"))


def test_a_file_with_malformed_lines_imports_the_rest_and_lists_them(tmp_path):
    path = tmp_path / "letters.jsonl"
    path.write_text('{"task_id": "a"}\n[]\n')
    with pytest.raises(CommandError, match=r"2 record\(s\) could not be imported"):
        call_command("dlq", "import", "--from", str(path), stdout=io.StringIO(),
                     stderr=(err := io.StringIO()))
    assert "  skipped line 1: missing fields: task_name," in err.getvalue()
    assert "  skipped line 2: not a JSON object but list" in err.getvalue()


# -- one serialisation ------------------------------------------------------------------------


def test_export_and_import_through_kafka_equals_through_a_file(letters, producer, monkeypatch,
                                                               tmp_path):
    # Given the same letters exported to a topic and to a file
    path = tmp_path / "letters.jsonl"
    run("export", "--to", TOPIC)
    run("export", "-o", str(path))
    originals = {r["task_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    # When each is imported into an empty table
    DeadLetter.objects.all().delete()
    serve(monkeypatch, FakeConsumer(as_topic(producer.produced, partitions=3),
                                    partitions=(0, 1, 2)))
    run("import", "--from", TOPIC, "--timeout", "0.2")
    through_kafka = snapshot()
    DeadLetter.objects.all().delete()
    run("import", "--from", str(path))
    through_file = snapshot()
    # Then both give the same letters: the masked records, secrets still masked
    assert through_kafka == through_file
    card = next(letter for letter in through_file if letter["task_id"] == "card-1")
    assert card["args"] == [MASK, MASK] and card["kwargs"] == {"api_token": MASK}
    assert card["events"] == [("imported", card["events"][0][1], "created")]
    for letter in through_file:
        original = originals[letter["task_id"]]
        for name in ("task_name", "args", "kwargs", "raw_body", "kind", "attempts",
                     "fingerprint", "exception_message", "queue"):
            assert letter[name] == original[name], name
    # replaying arrives parked, and the saga step names no run of this database
    saga = next(letter for letter in through_file if letter["task_id"] == "saga-4-1-step")
    assert saga["status"] == "parked" and saga["headers"] == {"headers": {"recovery_saga": None}}
