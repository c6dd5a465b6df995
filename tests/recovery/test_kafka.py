"""``recovery.store.kafka`` on real PostgreSQL, with fakes at the Kafka client boundary
(tests/kafka_fakes.py): no broker can run here. Where the real confluent-kafka client can
be used without a broker (its settings, a delivery to a port nobody listens on), it is."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone as dt_timezone

import psycopg
import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from recovery.core.redaction import MASK
from recovery.models import DeadLetter, DeadLetterEvent
from recovery.store import importing, kafka
from tests.kafka_fakes import (FakeConsumer, FakeError, FakeMessage, FakeProducer, as_topic,
                               eof)

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"
URL = kafka.parse_url("kafka://broker-1:9092,broker-2:9093/payments.DLT")
SECRETS = ("tok_live_4242", "hunter2", "sk_live_abc", "at_secret", "old_pw")
FIRST_FAILED = datetime(2026, 11, 28, 10, 0, 0, 123000, tzinfo=dt_timezone.utc)


def make(n: int, **overrides) -> DeadLetter:
    values = dict(task_id=f"t-{n}", task_name=TASK, args=[n, 100], kwargs={},
                  fingerprint="c" * 40, kind="dependency", queue="payments",
                  exception_type="recovery.core.errors.DependencyError",
                  exception_message=f"declined {n}", first_failed_at=FIRST_FAILED)
    values.update(overrides)
    return DeadLetter.objects.create(**values)


@pytest.fixture
def secret_letters():
    """Secrets in kwargs, headers, a nested argument, the message, the traceback and the
    audit trail, on a task this app cannot import (so its positional arguments are masked
    too)."""
    card = make(1, task_name="billing.tasks.charge_card", args=[7, "tok_live_4242"],
                kwargs={"api_token": "at_secret", "note": "first order"},
                headers={"headers": {"authorization": "Bearer sk_live_abc", "trace": "tr-1"}},
                exception_message="token tok_live_4242 declined",
                traceback="Traceback ...\n  charge('tok_live_4242')\nDeclined: tok_live_4242",
                status=DeadLetter.Status.PARKED, attempts=3)
    DeadLetterEvent.objects.create(
        letter=card, action="edited", actor="alice",
        before={"args": [7, "old_pw"], "kwargs": {}}, after={"args": [7, "x"], "kwargs": {}})
    row = make(2, task_name="tasks.tasks.import_customer_row",
               args=[{"id": 3, "email": "a@b.c", "password": "hunter2"}], queue="",
               status=DeadLetter.Status.RESOLVED)
    return card, row


def exported(**options) -> FakeProducer:
    producer = FakeProducer()
    kafka.export_letters(DeadLetter.objects.order_by("pk"), URL, producer=producer, **options)
    return producer


def headers_of(record) -> dict[str, bytes]:
    return dict(record.headers)


# -- URLs -------------------------------------------------------------------------------------


def test_a_url_names_servers_a_topic_and_allowed_client_settings():
    url = kafka.parse_url("kafka://a.example:9093,b.example,[::1]:19092/orders.DLT"
                          "?security.protocol=SASL_SSL&sasl.mechanisms=SCRAM-SHA-512"
                          "&ssl.ca.location=/etc/ssl/ca.pem")
    assert url.servers == ("a.example:9093", "b.example:9092", "[::1]:19092")
    assert url.topic == "orders.DLT"
    assert str(url) == "kafka://a.example:9093,b.example:9092,[::1]:19092/orders.DLT"
    config = url.client_config({"RECOVERY_KAFKA_SASL_USERNAME": "svc",
                                "RECOVERY_KAFKA_SASL_PASSWORD": "pw"})
    assert config == {"bootstrap.servers": "a.example:9093,b.example:9092,[::1]:19092",
                      "client.id": "celery-recovery", "security.protocol": "sasl_ssl",
                      "sasl.mechanism": "SCRAM-SHA-512", "ssl.ca.location": "/etc/ssl/ca.pem",
                      "sasl.username": "svc", "sasl.password": "pw"}


@pytest.mark.parametrize("text, error", [
    ("redis://h:6379/0", "is not a kafka:// URL"),
    ("kafka:///topic", "names no broker"),
    ("kafka://h:9092", "names no topic"),
    ("kafka://h:9092/", "names no topic"),
    ("kafka://h:0/t", "port must be a number from 1 to 65535"),
    ("kafka://h:http/t", "port must be a number"),
    ("kafka://h_1!:9092/t", "is not a host name"),
    ("kafka://h:9092/a/b", "is not a Kafka topic name"),
    ("kafka://h:9092/..", "is not a Kafka topic name"),
    ("kafka://h:9092/" + "t" * 250, "is not a Kafka topic name"),
    ("kafka://svc:pw@h:9092/t", "put them in RECOVERY_KAFKA_SASL_USERNAME"),
    ("kafka://h:9092/t?sasl.password=pw", "set RECOVERY_KAFKA_SASL_PASSWORD instead"),
    ("kafka://h:9092/t?sasl.username=svc", "set RECOVERY_KAFKA_SASL_USERNAME instead"),
    ("kafka://h:9092/t?ssl.key.password=pw", "set RECOVERY_KAFKA_SSL_KEY_PASSWORD instead"),
    ("kafka://h:9092/t?enable.idempotence=false", "not a setting a kafka:// URL may carry"),
    ("kafka://h:9092/t?security.protocol=telnet", "is none of"),
    ("kafka://h:9092/t#x", "has no #fragment"),
])
def test_a_bad_url_is_refused_saying_what_to_write(text, error):
    with pytest.raises(kafka.KafkaURLError, match=error):
        kafka.parse_url(text)


def test_sasl_with_a_password_mechanism_needs_the_credentials_in_the_environment():
    url = kafka.parse_url("kafka://h/t?security.protocol=SASL_SSL&sasl.mechanism=PLAIN")
    with pytest.raises(kafka.KafkaURLError, match="set RECOVERY_KAFKA_SASL_USERNAME and "
                                                  "RECOVERY_KAFKA_SASL_PASSWORD"):
        url.client_config({})


def test_confluent_kafka_accepts_the_producer_and_consumer_settings():
    # The real client validates every setting name and value when it is created, without
    # connecting to anything.
    confluent_kafka = pytest.importorskip("confluent_kafka")
    url = kafka.parse_url("kafka://127.0.0.1:1/t?security.protocol=PLAINTEXT&compression.type=zstd")
    confluent_kafka.Producer(kafka.producer_config(url, timeout_seconds=5, environ={}))
    consumer = confluent_kafka.Consumer(kafka.consumer_config(url, group_id="g", environ={}))
    consumer.close()


def test_the_error_codes_are_confluent_kafkas():
    errors = pytest.importorskip("confluent_kafka").KafkaError
    assert kafka._PARTITION_EOF == errors._PARTITION_EOF
    assert kafka._UNKNOWN_TOPIC == errors._UNKNOWN_TOPIC
    assert kafka._UNKNOWN_TOPIC_OR_PART == errors.UNKNOWN_TOPIC_OR_PART
    assert kafka._TOPIC_AUTHORIZATION_FAILED == errors.TOPIC_AUTHORIZATION_FAILED
    assert kafka._GROUP_AUTHORIZATION_FAILED == errors.GROUP_AUTHORIZATION_FAILED


def test_without_confluent_kafka_the_error_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_confluent(name, *args, **kwargs):
        if name == "confluent_kafka":
            raise ImportError("No module named 'confluent_kafka'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_confluent)
    with pytest.raises(kafka.KafkaUnavailable, match=r"celery-recovery\[kafka\]"):
        kafka.make_producer(URL, timeout_seconds=1)
    with pytest.raises(kafka.KafkaUnavailable, match="confluent-kafka==2.16.1"):
        kafka.make_consumer(URL, group_id="g")


# -- export -----------------------------------------------------------------------------------


def test_export_writes_one_record_per_letter_keyed_by_task_id_with_secrets_masked(secret_letters):
    producer = exported()
    assert [(r.topic, r.key) for r in producer.produced] == [
        ("payments.DLT", b"t-1"), ("payments.DLT", b"t-2")]
    for record in producer.produced:
        raw = record.value + b"".join(value for _, value in record.headers)
        for secret in SECRETS:
            assert secret.encode() not in raw, secret
    card = json.loads(producer.produced[0].value)
    assert card["task_id"] == "t-1"
    assert card["args"] == [MASK, MASK]  # the task is unknown here: any of them may be secret
    assert card["kwargs"] == {"api_token": MASK, "note": "first order"}
    assert card["headers"] == {"headers": {"authorization": MASK, "trace": "tr-1"}}
    assert card["exception_message"] == f"token {MASK} declined"
    [event] = card["events"]
    assert event["before"] == {"args": [MASK, MASK], "kwargs": {}}
    row = json.loads(producer.produced[1].value)
    assert row["args"] == [{"id": 3, "email": "a@b.c", "password": MASK}]
    assert producer.flushed == [65.0]


def test_the_record_value_is_the_file_exports_line(secret_letters):
    # One serialisation: the Kafka value is byte for byte the JSON line `dlq export` writes.
    import io

    from recovery.store import export

    out = io.StringIO()
    export.write_jsonl(DeadLetter.objects.order_by("pk"), out)
    lines = out.getvalue().splitlines()
    assert [r.value.decode("utf-8") for r in exported().produced] == lines
    out = io.StringIO()
    export.write_jsonl(DeadLetter.objects.order_by("pk"), out, events=False)
    assert [r.value.decode() for r in exported(events=False).produced] == out.getvalue().splitlines()


def test_records_carry_spring_kafkas_dead_letter_headers_and_ours(secret_letters):
    card, row = secret_letters
    first, second = exported().produced
    headers = headers_of(first)
    assert headers["kafka_dlt-exception-fqcn"] == b"recovery.core.errors.DependencyError"
    assert headers["kafka_dlt-exception-message"] == f"token {MASK} declined".encode()
    assert headers["kafka_dlt-exception-stacktrace"].decode() == (
        f"Traceback ...\n  charge('{MASK}')\nDeclined: {MASK}")
    assert headers["kafka_dlt-original-topic"] == b"payments"
    # Spring writes timestamps as 8-byte big-endian milliseconds since the epoch
    [millis] = struct.unpack(">q", headers["kafka_dlt-original-timestamp"])
    assert millis == int(FIRST_FAILED.timestamp() * 1000)
    assert headers["kafka_dlt-original-timestamp-type"] == b"CreateTime"
    assert {name: headers[name] for name in (
        "recovery-format", "recovery-task-name", "recovery-kind", "recovery-status",
        "recovery-fingerprint", "recovery-attempts", "recovery-secrets")} == {
        "recovery-format": b"1", "recovery-task-name": b"billing.tasks.charge_card",
        "recovery-kind": b"dependency", "recovery-status": b"parked",
        "recovery-fingerprint": b"c" * 40, "recovery-attempts": b"3",
        "recovery-secrets": b"masked"}
    # No queue, no original topic; every header name appears once
    assert "kafka_dlt-original-topic" not in headers_of(second)
    assert len(first.headers) == len(headers)


def test_a_long_stack_trace_header_is_cut_saying_the_value_has_it_whole():
    make(1, traceback="x" * 100_000)
    [record] = exported().produced
    header = headers_of(record)["kafka_dlt-exception-stacktrace"].decode()
    assert len(header) <= kafka.HEADER_STACKTRACE_MAX_CHARS
    assert header.endswith("chars cut: the value has it whole]")
    assert json.loads(record.value)["traceback"] == "x" * 100_000


def test_filters_choose_the_letters_exported(secret_letters):
    producer = FakeProducer()
    sent = kafka.export_letters(DeadLetter.objects.filter(status="resolved"), URL,
                                producer=producer)
    assert sent == 1 and [r.key for r in producer.produced] == [b"t-2"]


def test_a_failed_delivery_fails_the_export_naming_how_many_were_delivered():
    for n in range(1, 5):
        make(n)
    producer = FakeProducer(fail=lambda key: FakeError(-192, "Local: Message timed out")
                            if key == b"t-3" else None)
    with pytest.raises(kafka.DeliveryError) as caught:
        kafka.export_letters(DeadLetter.objects.order_by("pk"), URL, producer=producer)
    assert str(caught.value) == ("3 of 4 letters delivered to kafka://broker-1:9092,"
                                 "broker-2:9093/payments.DLT; 1 failed (t-3: Local: Message "
                                 "timed out)")


def test_a_record_the_client_refuses_is_counted_and_the_rest_are_still_sent():
    for n in range(1, 4):
        make(n)
    producer = FakeProducer(refuse=lambda key: RuntimeError("Broker: Message size too large")
                            if key == b"t-1" else None)
    with pytest.raises(kafka.DeliveryError, match=r"2 of 3 letters delivered .*; 1 failed "
                                                  r"\(t-1: not produced \(Broker: Message size"):
        kafka.export_letters(DeadLetter.objects.order_by("pk"), URL, producer=producer)
    assert [r.key for r in producer.produced] == [b"t-2", b"t-3"]


def test_deliveries_still_unconfirmed_when_the_flush_gives_up_fail_the_export():
    for n in range(1, 4):
        make(n)
    producer = FakeProducer(lose={b"t-2", b"t-3"})
    with pytest.raises(kafka.DeliveryError,
                       match=r"^1 of 3 letters delivered .*; 0 failed, 2 not confirmed within 5s$"):
        kafka.export_letters(DeadLetter.objects.order_by("pk"), URL, producer=producer,
                             timeout_seconds=5)


def test_a_full_local_queue_is_waited_out_serving_delivery_reports():
    make(1)

    class Full(FakeProducer):
        refusals = 2

        def produce(self, *args, **kwargs):
            if self.refusals:
                self.refusals -= 1
                raise BufferError("Local: Queue full")
            super().produce(*args, **kwargs)

    producer = Full()
    assert kafka.export_letters(DeadLetter.objects.all(), URL, producer=producer) == 1
    assert producer.refusals == 0 and len(producer.produced) == 1


def test_the_real_client_reports_a_delivery_it_could_not_make():
    # Given the real confluent-kafka producer and a port where no broker listens
    pytest.importorskip("confluent_kafka")
    make(1)
    nowhere = kafka.parse_url("kafka://127.0.0.1:1/letters.DLT")
    # When the export waits one second for the broker
    with pytest.raises(kafka.DeliveryError) as caught:
        kafka.export_letters(DeadLetter.objects.all(), nowhere, timeout_seconds=1)
    # Then the letter is reported failed (librdkafka's own delivery report), not lost silently
    assert str(caught.value) == ("0 of 1 letter delivered to kafka://127.0.0.1:1/letters.DLT; "
                                 "1 failed (t-1: Local: Message timed out)")


# -- import -----------------------------------------------------------------------------------


def import_from(messages, **options) -> tuple[kafka.Imported, FakeConsumer]:
    consumer = options.pop("consumer", None) or FakeConsumer(messages)
    result = kafka.import_letters(URL, actor="cli:ops", consumer=consumer, idle_seconds=0.2,
                                  **options)
    return result, consumer


def letters() -> dict[str, dict]:
    return {row["task_id"]: row for row in DeadLetter.objects.values("task_id", *importing.IMPORTED)}


def test_import_upserts_every_letter_and_commits_the_offsets_read(secret_letters):
    topic = as_topic(exported().produced)
    before = letters()
    DeadLetter.objects.all().delete()
    result, consumer = import_from(topic)
    assert (result.created, result.read, result.ok) == (2, 2, True)
    after = letters()
    assert set(after) == {"t-1", "t-2"}
    assert after["t-1"]["args"] == [MASK, MASK]  # a masked value stays masked
    assert after["t-1"]["kwargs"] == {"api_token": MASK, "note": "first order"}
    for name in ("status", "attempts", "fingerprint", "first_failed_at", "queue", "task_name"):
        assert after["t-1"][name] == before["t-1"][name]
    assert consumer.subscribed == ["payments.DLT"] and consumer.closed
    last = {m.partition(): m.offset() + 1 for m in topic}
    assert consumer.committed == last
    # The audit trail is this database's own: one `imported` event, none of the source's
    [event] = DeadLetterEvent.objects.filter(letter__task_id="t-1")
    assert (event.action, event.actor) == ("imported", "cli:ops")
    assert event.note.startswith("from kafka://broker-1:9092,broker-2:9093/payments.DLT, "
                                 "partition ")
    assert event.note.endswith("its source's audit trail (1 event) is not imported")


def test_a_second_import_of_the_same_records_changes_nothing(secret_letters):
    topic = as_topic(exported().produced)
    DeadLetter.objects.all().delete()
    import_from(topic)
    first = letters()
    updated = dict(DeadLetter.objects.values_list("task_id", "updated_at"))
    events = DeadLetterEvent.objects.count()
    result, _ = import_from(topic)
    assert (result.created, result.updated, result.unchanged, result.kept) == (0, 0, 2, [])
    assert letters() == first
    assert dict(DeadLetter.objects.values_list("task_id", "updated_at")) == updated
    assert DeadLetterEvent.objects.count() == events


def test_a_newer_record_updates_a_letter_an_earlier_import_wrote():
    letter = make(1)
    old = as_topic(exported().produced)
    letter.status, letter.attempts = DeadLetter.Status.RESOLVED, 4
    letter.save()
    newer = as_topic(exported().produced)
    DeadLetter.objects.all().delete()
    import_from(old)
    result, _ = import_from(newer)
    assert result.updated == 1
    assert DeadLetter.objects.values_list("status", "attempts").get() == ("resolved", 4)
    assert [e.outcome.split()[0] for e in DeadLetterEvent.objects.order_by("pk")] == [
        "created", "updated"]


def test_a_letter_of_this_database_is_never_overwritten_by_an_import(secret_letters):
    card, _ = secret_letters
    make(3)
    topic = as_topic(exported().produced)
    # The source letters (with their real secrets) are still here: the masked records differ
    result, _ = import_from(topic)
    assert (result.created, result.updated) == (0, 0)
    assert result.unchanged == 1  # the letter without secrets equals its record
    assert sorted(line.split(": ", 1)[1] for line in result.kept) == [
        "t-1: a letter of this database, which an import never overwrites",
        "t-2: a letter of this database, which an import never overwrites"]
    card.refresh_from_db()
    assert card.args == [7, "tok_live_4242"]  # never replaced by the mask
    assert not DeadLetterEvent.objects.filter(action="imported").exists()


def test_a_letter_changed_here_since_its_import_is_kept():
    make(1)
    topic = as_topic(exported().produced)
    DeadLetter.objects.all().delete()
    import_from(topic)
    # An operator edits the payload and discards the letter
    DeadLetter.objects.filter(task_id="t-1").update(args=[1, 250], status="discarded")
    result, _ = import_from(topic)
    assert result.kept == [f"partition {topic[0].partition()} offset 0: t-1: changed here since "
                           f"it was imported; an import never overwrites that"]
    assert DeadLetter.objects.values_list("args", "status").get() == ([1, 250], "discarded")


def test_offsets_are_committed_only_after_the_rows_are_committed(secret_letters):
    # Given a topic of two records read one per batch
    topic = as_topic(exported().produced, partitions=1)
    DeadLetter.objects.all().delete()
    settings = connection.settings_dict
    seen = []

    def on_commit(offsets):
        # When the consumer commits, from another connection: the rows of the batch are
        # committed, and this connection is in no transaction
        with psycopg.connect(dbname=settings["NAME"], user=settings["USER"] or "postgres",
                             host=settings["HOST"] or "127.0.0.1",
                             port=settings["PORT"] or 5432) as other:
            ids = [r[0] for r in other.execute(
                "SELECT task_id FROM recovery_deadletter ORDER BY task_id").fetchall()]
        seen.append((dict(offsets), ids, connection.in_atomic_block))

    consumer = FakeConsumer(topic, partitions=(0,), batch=1, on_commit=on_commit)
    result, _ = import_from(None, consumer=consumer, batch_size=1)
    # Then each commit follows its own batch's database commit
    assert result.created == 2
    assert seen == [({0: 1}, ["t-1"], False), ({0: 2}, ["t-1", "t-2"], False)]


def test_a_batch_the_database_refuses_commits_no_offset(secret_letters, monkeypatch):
    topic = as_topic(exported().produced, partitions=1)
    DeadLetter.objects.all().delete()
    real = importing._write_one
    calls = []

    def down_at_the_second(incoming, **kwargs):
        calls.append(incoming.task_id)
        if len(calls) == 2:
            raise OperationalError("server closed the connection unexpectedly")
        return real(incoming, **kwargs)

    monkeypatch.setattr(importing, "_write_one", down_at_the_second)
    consumer = FakeConsumer(topic, partitions=(0,))
    with pytest.raises(OperationalError):
        import_from(None, consumer=consumer)
    assert consumer.commits == [] and consumer.closed
    assert not DeadLetter.objects.exists()  # the batch rolled back whole


def test_a_commit_that_fails_after_the_rows_are_in_is_reported_not_lost(secret_letters):
    topic = as_topic(exported().produced)
    DeadLetter.objects.all().delete()
    consumer = FakeConsumer(topic, commit_error=RuntimeError("Broker: Coordinator not available"))
    result, _ = import_from(None, consumer=consumer)
    assert result.created == 2 and not result.ok
    assert result.commit_error.startswith("offsets not committed (Broker: Coordinator not "
                                          "available); the records are imported")


def valid_record(**changes) -> dict:
    record = {"id": 9, "task_id": "r-1", "task_name": TASK, "args": [1, 100], "kwargs": {},
              "headers": {}, "raw_body": "", "content_type": "", "status": "parked",
              "kind": "dependency", "permanent": False, "reason": "", "exception_type": "E",
              "exception_message": "declined", "traceback": "", "attempts": 1,
              "replay_count": 0, "history": [], "queue": "q", "worker": "w",
              "fingerprint": "a" * 40, "first_failed_at": "2026-11-28 10:00:00+00:00",
              "last_failed_at": "2026-11-28T10:05:00Z", "created_at": "2026-11-28",
              "updated_at": "2026-11-28", "events": []}
    record.update(changes)
    return record


def message(offset: int, record=None, *, key=..., value=None, headers=None, partition=0):
    value = value if value is not None else json.dumps(record).encode()
    key = (record or {}).get("task_id", "").encode() if key is ... else key
    return FakeMessage(partition_=partition, offset_=offset, key_=key, value_=value,
                       headers_=headers)


def test_malformed_records_are_reported_with_partition_and_offset_and_the_rest_imported():
    missing = valid_record(task_id="r-3")
    del missing["fingerprint"]
    messages = [
        message(0, valid_record(task_id="r-1")),
        message(1, key=b"r-2", value=b'{"task_id": "r-2", '),
        message(2, missing),
        message(3, valid_record(task_id="r-4", attempts="3", args={"a": 1})),
        message(4, valid_record(task_id="r-5"), value=b"x" * 5000),
        message(5, valid_record(task_id="r-6"), key=b"r-1"),
        message(6, valid_record(task_id="r-7", is_superuser=True)),
        message(7, valid_record(task_id="r-8", status="approved")),
        message(8, valid_record(task_id="r-9"), headers=[("recovery-format", b"2")]),
        message(9, key=b"r-10", value=b"\xff\xfe"),
        message(10, valid_record(task_id="r-11", fingerprint="z" * 40)),
        message(11, valid_record(task_id="r-12", first_failed_at="yesterday")),
        message(12, key=b"r-13", value=b"[1, 2]"),
        message(13, valid_record(task_id="r-14", task_name="t" * 256)),
        message(0, valid_record(task_id="r-15"), partition=1),
    ]
    result, consumer = import_from(messages, max_record_bytes=4000)
    assert sorted(DeadLetter.objects.values_list("task_id", flat=True)) == ["r-1", "r-15"]
    assert result.created == 2 and not result.ok
    assert result.skipped == [
        "partition 0 offset 1: not JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 20 (char 19))",
        "partition 0 offset 2: missing fields: fingerprint",
        "partition 0 offset 3: fields of the wrong type: attempts, args",
        "partition 0 offset 4: 5000 bytes, over the 4000 bytes a record may have",
        "partition 0 offset 5: its key (b'r-1') is not its task id ('r-6')",
        "partition 0 offset 6: fields no export writes: is_superuser",
        "partition 0 offset 7: status 'approved' is none of parked, replaying, resolved, "
        "discarded, compensated",
        "partition 0 offset 8: record format b'2'; this version reads 1",
        "partition 0 offset 9: not UTF-8 text",
        "partition 0 offset 10: fingerprint is not 40 lowercase hex digits",
        "partition 0 offset 11: first_failed_at is not an ISO date and time ('yesterday')",
        "partition 0 offset 12: not a JSON object but list",
        "partition 0 offset 13: task_name is longer than its 255 characters",
    ]
    # Skipped records are reported once, not read again: their offsets are committed too
    assert consumer.committed == {0: 14, 1: 1}


def test_a_tombstone_is_counted_and_nothing_is_written():
    result, consumer = import_from([FakeMessage(key_=b"r-1", value_=None)])
    assert (result.empty, result.created, result.ok) == (1, 0, True)
    assert consumer.committed == {0: 1}


def test_max_messages_stops_the_import_there():
    messages = [message(n, valid_record(task_id=f"r-{n}")) for n in range(5)]
    result, consumer = import_from(messages, max_messages=3, batch_size=2)
    assert (result.read, result.created) == (3, 3)
    assert consumer.consumed_counts == [2, 1]
    assert consumer.committed == {0: 3}


def test_reading_stops_at_the_end_of_every_partition_and_a_new_record_resets_it():
    messages = [eof(0), message(0, valid_record(task_id="r-1"), partition=1),
                message(0, valid_record(task_id="r-2"))]
    consumer = FakeConsumer(messages, batch=1)
    result, _ = import_from(None, consumer=consumer)
    # partition 0 reached its end once, then had a record: the end is read again after it
    assert result.created == 2 and result.incomplete is None


def test_an_import_that_hears_nothing_stops_and_says_it_is_incomplete():
    consumer = FakeConsumer([message(0, valid_record())], partitions=(0, 1), eof=False)
    result, _ = import_from(None, consumer=consumer)
    assert result.created == 1 and not result.ok
    assert result.incomplete == ("nothing arrived for 0.2s before the end of partitions 0, 1")
    consumer = FakeConsumer([FakeMessage(error_=FakeError(-195, "Local: Broker transport "
                                                                "failure"))], eof=False)
    consumer._assigned = True  # the group never assigned anything
    result, _ = import_from(None, consumer=consumer)
    assert result.incomplete == ("no partition of kafka://broker-1:9092,broker-2:9093/"
                                 "payments.DLT was assigned within 0.2s: is a broker reachable? "
                                 "(last client error: Local: Broker transport failure)")


@pytest.mark.parametrize("error", [
    FakeError(3, "Broker: Unknown topic or partition"),
    FakeError(29, "Broker: Topic authorization failed"),
    FakeError(-150, "Local: Fatal error", fatal=True),
])
def test_a_topic_that_cannot_be_read_stops_the_import_with_the_clients_reason(error):
    consumer = FakeConsumer([FakeMessage(error_=error)])
    with pytest.raises(kafka.KafkaImportError, match=f"cannot read kafka://.*: {error}"):
        import_from(None, consumer=consumer)
    assert consumer.closed and consumer.commits == []


def test_import_needs_no_given_group_and_makes_a_fresh_one(monkeypatch):
    groups = []
    monkeypatch.setattr(kafka, "make_consumer", lambda url, group_id: groups.append(group_id)
                        or FakeConsumer([]))
    kafka.import_letters(URL, actor="cli", idle_seconds=0.1)
    kafka.import_letters(URL, actor="cli", idle_seconds=0.1)
    kafka.import_letters(URL, actor="cli", idle_seconds=0.1, group_id="restore-2026-11")
    assert groups[0].startswith("celery-recovery-import-") and groups[0] != groups[1]
    assert groups[2] == "restore-2026-11"


def test_times_survive_the_round_trip_exactly():
    moment = timezone.now() - timedelta(days=3)
    make(1, first_failed_at=moment, last_failed_at=moment + timedelta(seconds=1.5))
    topic = as_topic(exported().produced)
    DeadLetter.objects.all().delete()
    import_from(topic)
    letter = DeadLetter.objects.get()
    assert (letter.first_failed_at, letter.last_failed_at) == (moment, moment + timedelta(seconds=1.5))
