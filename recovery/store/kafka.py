"""Dead letters to and from a Kafka topic, laid out the way Spring Kafka lays out its
dead-letter topics (DLT), so a team that already reads ``<topic>.DLT`` can read ours.

``manage.py dlq export --to kafka://host:9092/orders.DLT`` and ``manage.py dlq import
--from kafka://host:9092/orders.DLT`` call :func:`export_letters` and
:func:`import_letters`. The mapping is in docs/kafka.md.

* **One record per letter.** Key: the task id (UTF-8), so a compacted topic keeps the
  latest of each letter and every record of one letter lands in one partition. Value:
  the same JSON record as ``dlq export`` writes to a file
  (:func:`recovery.store.export.letter_record`), always masked. Headers: Spring's
  ``kafka_dlt-*`` names (:data:`EXCEPTION_FQCN` and the rest), encoded as Spring encodes
  them, and recovery's own ``recovery-*`` ones.
* **Export:** an idempotent producer (``enable.idempotence``, ``acks=all``); every
  delivery report is checked after the flush, and any letter not confirmed makes the
  export fail (:class:`DeliveryError`, naming how many were delivered).
* **Import:** a consumer group of its own (a fresh one unless one is given) reads every
  partition to its end (or ``max_messages``). Each batch is upserted in one database
  transaction (:mod:`recovery.store.importing`), and its offsets are committed only after
  that transaction has committed: a crash in between reads the batch again, which the
  upsert makes harmless. A malformed record is reported with its partition and offset
  and skipped; the rest go on.

The client boundary is small on purpose: :class:`Producer` is confluent-kafka's own
``Producer`` (``produce``, ``poll``, ``flush``), and :class:`Consumer` four methods that
:class:`_ConfluentConsumer` maps onto confluent-kafka's ``Consumer``. Tests put fakes
there. confluent-kafka is optional: it is imported when a client is made, and its
absence is a :class:`KafkaUnavailable` that says how to install it.

**Not tested against a running broker here.** The machines this was built on cannot run
one. The tests cover everything up to the client calls (with fakes that keep the
records, keys, headers, partitions, offsets and errors), check that confluent-kafka
accepts the client settings, and let the real client fail to deliver to a port where no
broker listens. What a real broker adds (ACLs, SASL and TLS handshakes, rebalances while
an import runs, transactions, broker-side size limits) is not proven here.
"""

from __future__ import annotations

import os
import re
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from django.db.models import QuerySet

from ..core.bounds import cut
from . import export, importing

__all__ = ["KafkaURL", "KafkaURLError", "KafkaUnavailable", "KafkaClientError", "DeliveryError",
           "KafkaImportError",
           "Producer", "Consumer", "Message", "parse_url", "is_kafka_url", "record_headers",
           "export_letters", "import_letters", "make_producer", "make_consumer", "Imported",
           "ENVIRONMENT"]

SCHEME = "kafka"
DEFAULT_PORT = 9092

# Spring Kafka's dead-letter header names (org.springframework.kafka.support.KafkaHeaders).
EXCEPTION_FQCN = "kafka_dlt-exception-fqcn"
EXCEPTION_MESSAGE = "kafka_dlt-exception-message"
EXCEPTION_STACKTRACE = "kafka_dlt-exception-stacktrace"
ORIGINAL_TOPIC = "kafka_dlt-original-topic"
ORIGINAL_TIMESTAMP = "kafka_dlt-original-timestamp"
ORIGINAL_TIMESTAMP_TYPE = "kafka_dlt-original-timestamp-type"

# recovery's own headers.
FORMAT = "recovery-format"
TASK_NAME = "recovery-task-name"
KIND = "recovery-kind"
STATUS = "recovery-status"
FINGERPRINT = "recovery-fingerprint"
ATTEMPTS = "recovery-attempts"
SECRETS = "recovery-secrets"
#: the version of the record layout (the JSON value and these headers)
FORMAT_VERSION = b"1"

#: how much longer than the message timeout an export waits for the last delivery reports
#: (librdkafka reports every message by then, delivered or failed)
FLUSH_GRACE_SECONDS = 5.0

#: longest exception message and stack trace carried in a header (the value has them whole)
HEADER_MESSAGE_MAX_CHARS = 8 * 1024
HEADER_STACKTRACE_MAX_CHARS = 16 * 1024

#: Credentials are read from the environment, never from the URL (shell history, ps, logs).
ENVIRONMENT: Mapping[str, str] = {
    "RECOVERY_KAFKA_SASL_USERNAME": "sasl.username",
    "RECOVERY_KAFKA_SASL_PASSWORD": "sasl.password",
    "RECOVERY_KAFKA_SSL_KEY_PASSWORD": "ssl.key.password",
}

#: librdkafka settings a URL may carry as query parameters, with the values allowed
#: (None: any value).
URL_OPTIONS: Mapping[str, frozenset[str] | None] = {
    "security.protocol": frozenset({"plaintext", "ssl", "sasl_plaintext", "sasl_ssl"}),
    "sasl.mechanism": frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI",
                                 "OAUTHBEARER"}),
    "ssl.ca.location": None,
    "ssl.certificate.location": None,
    "ssl.key.location": None,
    "ssl.endpoint.identification.algorithm": frozenset({"https", "none"}),
    "client.id": None,
    "compression.type": frozenset({"none", "gzip", "snappy", "lz4", "zstd"}),
}
_CASE_INSENSITIVE = ("security.protocol",)

# confluent_kafka.KafkaError codes (tests/recovery/test_kafka.py checks them against it)
_PARTITION_EOF = -191
_UNKNOWN_TOPIC = -188
_UNKNOWN_TOPIC_OR_PART = 3
_TOPIC_AUTHORIZATION_FAILED = 29
_GROUP_AUTHORIZATION_FAILED = 30
_STOPPING = (_UNKNOWN_TOPIC, _UNKNOWN_TOPIC_OR_PART, _TOPIC_AUTHORIZATION_FAILED,
             _GROUP_AUTHORIZATION_FAILED)

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")


class KafkaURLError(ValueError):
    """A ``kafka://`` URL that cannot be used; the message says what to write instead."""


class KafkaUnavailable(RuntimeError):
    """confluent-kafka is not installed."""


class KafkaClientError(RuntimeError):
    """The client refused its settings (a CA file that cannot be read, say) or failed for
    good; the message is the client's own."""


class DeliveryError(KafkaClientError):
    """Some letters were not confirmed delivered; the message says how many were."""


class KafkaImportError(KafkaClientError):
    """The topic cannot be read (unknown, not authorised, or a fatal client error)."""


# -- the URL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaURL:
    """Where letters go to or come from: bootstrap servers, a topic, client settings."""

    servers: tuple[str, ...]
    topic: str
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{SCHEME}://{','.join(self.servers)}/{self.topic}"

    def client_config(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """librdkafka settings: the servers, the URL's options and the credentials from
        ``environ`` (:data:`ENVIRONMENT`; default ``os.environ``).

        Raises:
            KafkaURLError: a SASL mechanism that needs a user name and password is named
                but the environment holds neither.
        """
        environ = os.environ if environ is None else environ
        config: dict[str, Any] = {"bootstrap.servers": ",".join(self.servers),
                                  "client.id": "celery-recovery", **self.options}
        for variable, setting in ENVIRONMENT.items():
            if environ.get(variable):
                config[setting] = environ[variable]
        mechanism = config.get("sasl.mechanism", "")
        protocol = config.get("security.protocol", "plaintext").lower()
        if (protocol.startswith("sasl") and mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
                and not (config.get("sasl.username") and config.get("sasl.password"))):
            raise KafkaURLError(
                f"sasl.mechanism={mechanism} needs a user name and password: set "
                f"RECOVERY_KAFKA_SASL_USERNAME and RECOVERY_KAFKA_SASL_PASSWORD in the "
                f"environment")
        return config


def is_kafka_url(text: str) -> bool:
    """Whether ``text`` names a Kafka topic rather than a file."""
    return text.lower().startswith(f"{SCHEME}://")


def _server(text: str) -> str:
    host, port = text, DEFAULT_PORT
    match = re.match(r"^(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>[^:]*))?$", text)
    if match is None:
        raise KafkaURLError(f"{text!r} is not host:port (write an IPv6 address as [::1]:9092)")
    host = match["host"]
    if match["port"] is not None:
        if not match["port"].isdigit() or not 0 < int(match["port"]) < 65536:
            raise KafkaURLError(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(match["port"])
    if not _HOST.match(host):
        raise KafkaURLError(f"{text!r}: {host!r} is not a host name or address")
    return f"{host}:{port}"


def parse_url(text: str) -> KafkaURL:
    """``kafka://host[:port][,host2[:port]]/topic[?security.protocol=SASL_SSL&...]``.

    The port defaults to 9092. Query parameters are librdkafka settings from
    :data:`URL_OPTIONS`; credentials come from the environment (:data:`ENVIRONMENT`).

    Raises:
        KafkaURLError: another scheme, no host or topic, a bad port or topic name, a
            user or password in the URL, or a setting that is not allowed.
    """
    parts = urlsplit(text.strip())
    if parts.scheme.lower() != SCHEME:
        raise KafkaURLError(f"{text!r} is not a kafka:// URL (kafka://host:9092/topic)")
    if "@" in parts.netloc:
        raise KafkaURLError(
            "the URL names a user or password: put them in RECOVERY_KAFKA_SASL_USERNAME and "
            "RECOVERY_KAFKA_SASL_PASSWORD instead (a URL ends up in shell history and logs)")
    if not parts.netloc:
        raise KafkaURLError(f"{text!r} names no broker (kafka://host:9092/topic)")
    servers = tuple(_server(server.strip()) for server in parts.netloc.split(","))
    topic = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not topic:
        raise KafkaURLError(f"{text!r} names no topic (kafka://host:9092/topic)")
    if not _TOPIC.match(topic) or topic in (".", ".."):
        raise KafkaURLError(f"{topic[:80]!r} is not a Kafka topic name: letters, digits, '.', "
                            f"'_' and '-', at most 249")
    if parts.fragment:
        raise KafkaURLError(f"{text!r}: a kafka:// URL has no #fragment")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name in ("sasl.username", "sasl.password", "ssl.key.password") or "password" in name:
            variable = next(v for v, s in ENVIRONMENT.items() if s == name) \
                if name in ENVIRONMENT.values() else "the environment"
            raise KafkaURLError(f"{name} is a credential: set {variable} instead of putting it "
                                f"in the URL")
        if name == "sasl.mechanisms":  # librdkafka's alias
            name = "sasl.mechanism"
        if name not in URL_OPTIONS:
            raise KafkaURLError(f"{name!r} is not a setting a kafka:// URL may carry; allowed: "
                                f"{', '.join(URL_OPTIONS)}")
        allowed = URL_OPTIONS[name]
        compared = value.lower() if name in _CASE_INSENSITIVE else value
        if allowed is not None and compared not in allowed:
            raise KafkaURLError(f"{name}={value[:40]!r} is none of {', '.join(sorted(allowed))}")
        options[name] = compared
    return KafkaURL(servers, topic, options)


# -- the client boundary ----------------------------------------------------------------------


class Message(Protocol):
    """A record as confluent-kafka's consumer returns it (``confluent_kafka.Message``)."""

    def error(self) -> Any: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...


class Producer(Protocol):
    """The part of ``confluent_kafka.Producer`` an export uses."""

    def produce(self, topic: str, *, key: bytes, value: bytes,
                headers: list[tuple[str, bytes]],
                on_delivery: Callable[[Any, Any], None]) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


class Consumer(Protocol):
    """What an import needs of a consumer, in partition numbers rather than client types."""

    def subscribe(self, topic: str, on_assign: Callable[[list[int]], None]) -> None: ...
    def consume(self, count: int, timeout: float) -> list[Message]: ...
    def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit, synchronously, the next offset to read of each partition."""
    def close(self) -> None: ...


def _confluent() -> Any:
    try:
        import confluent_kafka
    except ImportError:
        raise KafkaUnavailable(
            "confluent-kafka is not installed; install it with `pip install "
            "'celery-recovery[kafka]'` (or confluent-kafka==2.16.1)") from None
    return confluent_kafka


def _client_text(problem: Any) -> str:
    """A ``confluent_kafka.KafkaException`` or ``KafkaError`` as the client words it
    (``Local: Message timed out``, not ``KafkaError{code=_MSG_TIMED_OUT,...}``)."""
    error = problem.args[0] if isinstance(problem, BaseException) and problem.args else problem
    return error.str() if callable(getattr(error, "str", None)) else str(problem)


def producer_config(url: KafkaURL, *, timeout_seconds: float,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An idempotent producer that waits for every in-sync replica, and gives a letter up
    (with a delivery report) after ``timeout_seconds``."""
    return {**url.client_config(environ), "enable.idempotence": True, "acks": "all",
            "message.timeout.ms": max(1, int(timeout_seconds * 1000))}


def consumer_config(url: KafkaURL, *, group_id: str,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A consumer that commits by hand only, starts a new group at the beginning, says
    when it reaches the end of a partition, and reads committed transactions only."""
    return {**url.client_config(environ), "group.id": group_id, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
            "enable.partition.eof": True, "isolation.level": "read_committed"}


def make_producer(url: KafkaURL, *, timeout_seconds: float) -> Producer:
    """confluent-kafka's producer with :func:`producer_config`.

    Raises:
        KafkaUnavailable: confluent-kafka is not installed.
        KafkaClientError: the client refused its settings.
    """
    client = _confluent()
    try:
        return client.Producer(producer_config(url, timeout_seconds=timeout_seconds))
    except client.KafkaException as exc:
        raise KafkaClientError(f"{url}: {_client_text(exc)}") from None


class _ConfluentConsumer:
    """:class:`Consumer` on ``confluent_kafka.Consumer``; the client's exceptions become
    :class:`KafkaClientError` and :class:`KafkaImportError`."""

    def __init__(self, url: KafkaURL, group_id: str) -> None:
        self._kafka = _confluent()
        self._url = url
        try:
            self._consumer = self._kafka.Consumer(consumer_config(url, group_id=group_id))
        except self._kafka.KafkaException as exc:
            raise KafkaClientError(f"{url}: {_client_text(exc)}") from None

    def subscribe(self, topic: str, on_assign: Callable[[list[int]], None]) -> None:
        try:
            self._consumer.subscribe(
                [topic], on_assign=lambda _consumer, partitions: on_assign(
                    [partition.partition for partition in partitions]))
        except self._kafka.KafkaException as exc:
            raise KafkaImportError(f"cannot read {self._url}: {_client_text(exc)}") from None

    def consume(self, count: int, timeout: float) -> list[Message]:
        try:
            return self._consumer.consume(num_messages=count, timeout=timeout)
        except self._kafka.KafkaException as exc:
            raise KafkaImportError(f"cannot read {self._url}: {_client_text(exc)}") from None

    def commit(self, offsets: Mapping[int, int]) -> None:
        self._consumer.commit(offsets=[self._kafka.TopicPartition(self._url.topic, partition, offset)
                                       for partition, offset in offsets.items()],
                              asynchronous=False)

    def close(self) -> None:
        self._consumer.close()


def make_consumer(url: KafkaURL, *, group_id: str) -> Consumer:
    """:class:`Consumer` on confluent-kafka's, with :func:`consumer_config`.

    Raises:
        KafkaUnavailable: confluent-kafka is not installed.
        KafkaClientError: the client refused its settings.
    """
    return _ConfluentConsumer(url, group_id)


# -- export -----------------------------------------------------------------------------------


def _text(value: Any) -> bytes:
    return str(value).encode("utf-8", "backslashreplace")


def _millis(moment: Any) -> int | None:
    return int(moment.timestamp() * 1000) if isinstance(moment, datetime) else None


def record_headers(record: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The headers of one letter's record, from its (masked) export record.

    Spring's: the exception class, message and stack trace (bounded), the Celery queue
    as the original topic, and the first failure as the original timestamp (8 bytes,
    big-endian milliseconds, as Spring writes it). recovery's: the record format, task
    name, kind, status, fingerprint, attempts, and that secrets are masked.
    """
    headers: list[tuple[str, bytes]] = []
    if record.get("exception_type"):
        headers.append((EXCEPTION_FQCN, _text(record["exception_type"])))
    if record.get("exception_message"):
        headers.append((EXCEPTION_MESSAGE, _text(cut(record["exception_message"],
                                                     HEADER_MESSAGE_MAX_CHARS))))
    if record.get("traceback"):
        headers.append((EXCEPTION_STACKTRACE, _text(cut(
            record["traceback"], HEADER_STACKTRACE_MAX_CHARS, "the value has it whole"))))
    if record.get("queue"):
        headers.append((ORIGINAL_TOPIC, _text(record["queue"])))
    first_failed = _millis(record.get("first_failed_at"))
    if first_failed is not None:
        headers.append((ORIGINAL_TIMESTAMP, struct.pack(">q", first_failed)))
        headers.append((ORIGINAL_TIMESTAMP_TYPE, b"CreateTime"))
    headers += [
        (FORMAT, FORMAT_VERSION),
        (TASK_NAME, _text(record["task_name"])),
        (KIND, _text(record["kind"])),
        (STATUS, _text(record["status"])),
        (FINGERPRINT, _text(record["fingerprint"])),
        (ATTEMPTS, _text(record["attempts"])),
        (SECRETS, b"masked"),
    ]
    return headers


@dataclass
class _Deliveries:
    """The delivery reports of one export."""

    delivered: int = 0
    failed: list[str] = field(default_factory=list)

    def report(self, task_id: str) -> Callable[[Any, Any], None]:
        def on_delivery(error: Any, _message: Any) -> None:
            if error is None:
                self.delivered += 1
            else:
                self.failed.append(f"{task_id}: {_client_text(error)}")
        return on_delivery


def _produce(producer: Producer, topic: str, *, key: bytes, value: bytes,
             headers: list[tuple[str, bytes]], on_delivery: Callable[[Any, Any], None],
             deadline: float) -> None:
    """Produce one record, waiting (serving delivery reports) while the client's local
    queue is full, until ``deadline``."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers,
                             on_delivery=on_delivery)
            return
        except BufferError:
            if time.monotonic() >= deadline:
                raise
            producer.poll(0.5)


def export_letters(queryset: QuerySet, url: KafkaURL, *, events: bool = True,
                   producer: Producer | None = None, timeout_seconds: float = 60.0) -> int:
    """Send each letter of ``queryset``, masked, as one record keyed by its task id; return
    how many the broker confirmed.

    Raises:
        DeliveryError: a letter was refused by the client, reported failed, or not
            confirmed within ``timeout_seconds`` after the last one was produced; the
            message says how many were delivered and names the first failures.
        KafkaUnavailable, KafkaClientError: no producer was given and none can be made.
    """
    producer = producer or make_producer(url, timeout_seconds=timeout_seconds)
    deliveries = _Deliveries()
    produced = refused = 0
    for record in export.records(queryset, reveal=False, events=events):
        task_id = record["task_id"]
        try:
            _produce(producer, url.topic, key=task_id.encode("utf-8"),
                     value=export.encoded(record).encode("utf-8"),
                     headers=record_headers(record), on_delivery=deliveries.report(task_id),
                     deadline=time.monotonic() + timeout_seconds)
        except Exception as exc:  # noqa: BLE001 - KafkaException, BufferError: counted
            deliveries.failed.append(f"{task_id}: not produced ({_client_text(exc)})")
            refused += 1
            continue
        produced += 1
        producer.poll(0)
    producer.flush(timeout_seconds + FLUSH_GRACE_SECONDS)  # serves the last delivery reports
    total = produced + refused
    if deliveries.delivered == total:
        return total
    failed = len(deliveries.failed)
    unconfirmed = total - deliveries.delivered - failed  # neither report came in time
    message = (f"{deliveries.delivered} of {total} letter{'s' if total != 1 else ''} "
               f"delivered to {url}; {failed} failed")
    if unconfirmed:
        message += f", {unconfirmed} not confirmed within {timeout_seconds:g}s"
    if failed:
        message += f" ({'; '.join(deliveries.failed[:5])}{'; ...' if failed > 5 else ''})"
    raise DeliveryError(message)


# -- import -----------------------------------------------------------------------------------


@dataclass
class Imported(importing.Report):
    """An import's :class:`~recovery.store.importing.Report`, plus how the reading ended."""

    read: int = 0
    #: why the import stopped before the end of every partition, or None
    incomplete: str | None = None
    #: offsets that could not be committed (the records are imported; a re-run reads them
    #: again and changes nothing)
    commit_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.skipped and self.incomplete is None and self.commit_error is None


def _header(message: Message, name: str) -> bytes | None:
    for key, value in message.headers() or ():
        if key == name:
            return value
    return None


def _incoming(message: Message, max_bytes: int) -> importing.Incoming:
    """One consumed record, checked: recovery's format, a value, and a key that is the
    record's task id."""
    version = _header(message, FORMAT)
    if version is not None and version != FORMAT_VERSION:
        raise importing.RecordError(f"record format {version[:20]!r}; this version reads "
                                    f"{FORMAT_VERSION.decode()}")
    incoming = importing.parse(message.value(), max_bytes=max_bytes)
    key = message.key()
    if key is None or key != incoming.task_id.encode("utf-8"):
        raise importing.RecordError(
            f"its key ({(key or b'')[:60]!r}) is not its task id ({incoming.task_id[:60]!r})")
    return incoming


class _Reading:
    """Which partitions an import holds, and which it has read to their end."""

    def __init__(self) -> None:
        self.assigned: set[int] | None = None
        self.at_end: set[int] = set()
        #: the last error the client reported that did not stop the import
        self.last_error = ""

    def on_assign(self, partitions: list[int]) -> None:
        self.assigned = set(partitions)
        self.at_end &= self.assigned

    @property
    def done(self) -> bool:
        return self.assigned is not None and self.assigned <= self.at_end


def import_letters(url: KafkaURL, *, actor: str, group_id: str | None = None,
                   max_messages: int | None = None, idle_seconds: float = 30.0,
                   batch_size: int = 500, max_record_bytes: int = importing.MAX_RECORD_BYTES,
                   consumer: Consumer | None = None) -> Imported:
    """Read the topic to the end of every partition (or ``max_messages`` records) and
    upsert its letters (:func:`recovery.store.importing.upsert`).

    ``group_id`` None reads the whole topic in a fresh group; a given group resumes from
    its committed offsets. Each batch's offsets are committed after its database
    transaction commits. Stops, saying so in ``incomplete``, when nothing arrives for
    ``idle_seconds`` before the end.

    Raises:
        KafkaImportError: the topic does not exist or may not be read, or the client
            failed for good; what was committed before stays.
        django.db.DatabaseError: the database refused a batch; its offsets are not
            committed.
        KafkaUnavailable, KafkaClientError: no consumer was given and none can be made.
    """
    group_id = group_id or f"celery-recovery-import-{uuid.uuid4().hex}"
    consumer = consumer or make_consumer(url, group_id=group_id)
    result = Imported()
    reading = _Reading()
    try:
        consumer.subscribe(url.topic, reading.on_assign)
        heard = time.monotonic()
        while not reading.done:
            wanted = batch_size if max_messages is None else min(batch_size,
                                                                  max_messages - result.read)
            if wanted <= 0:
                break
            batch, offsets, heard_now = _sorted(consumer.consume(wanted, 1.0), url, reading,
                                                result, max_record_bytes)
            if heard_now:
                heard = time.monotonic()
            elif time.monotonic() - heard >= idle_seconds:
                result.incomplete = _why_stopped(url, reading, idle_seconds)
                break
            if batch:
                importing.upsert(batch, actor=actor, source=str(url), report=result,
                                 after_commit=_committer(consumer, offsets, result))
            elif offsets:
                _committer(consumer, offsets, result)()
    finally:
        consumer.close()
    return result


def _sorted(messages: list[Message], url: KafkaURL, reading: _Reading, result: Imported,
            max_record_bytes: int) -> tuple[list[tuple[importing.Incoming, str]],
                                            dict[int, int], bool]:
    """One consumed batch sorted out: the records to upsert (each with where it was read),
    the next offset of each partition, and whether the broker was heard (a record or the
    end of a partition; a client error is not hearing from it). Malformed records and
    tombstones are counted in ``result``.

    Raises:
        KafkaImportError: an error that stops the import (see :data:`_STOPPING`).
    """
    batch: list[tuple[importing.Incoming, str]] = []
    offsets: dict[int, int] = {}
    heard = False
    for message in messages:
        error = message.error()
        if error is not None:
            if error.code() == _PARTITION_EOF:
                reading.at_end.add(message.partition())
                heard = True
            elif error.fatal() or error.code() in _STOPPING:
                raise KafkaImportError(f"cannot read {url}: {_client_text(error)}")
            else:
                reading.last_error = _client_text(error)
            continue
        heard = True
        partition, offset = message.partition(), message.offset()
        reading.at_end.discard(partition)
        offsets[partition] = offset + 1
        result.read += 1
        where = f"partition {partition} offset {offset}"
        if message.value() is None:
            result.empty += 1
            continue
        try:
            batch.append((_incoming(message, max_record_bytes), where))
        except importing.RecordError as exc:
            result.skip(where, exc)
    return batch, offsets, heard


def _committer(consumer: Consumer, offsets: Mapping[int, int],
               result: Imported) -> Callable[[], None]:
    """Commit ``offsets``; a failure is noted in ``result``, never raised: it runs after the
    rows are committed, which nothing can take back."""

    def commit() -> None:
        try:
            consumer.commit(dict(offsets))
        except Exception as exc:  # noqa: BLE001 - the rows are in; a re-run reads them again
            result.commit_error = (f"offsets not committed ({_client_text(exc)}); the records "
                                   f"are imported and a re-run reads them again, changing "
                                   f"nothing")
    return commit


def _why_stopped(url: KafkaURL, reading: _Reading, idle_seconds: float) -> str:
    error = f" (last client error: {reading.last_error})" if reading.last_error else ""
    if reading.assigned is None:
        return (f"no partition of {url} was assigned within {idle_seconds:g}s: is a broker "
                f"reachable?{error}")
    left = sorted(reading.assigned - reading.at_end)
    return (f"nothing arrived for {idle_seconds:g}s before the end of partition"
            f"{'s' if len(left) != 1 else ''} {', '.join(map(str, left))}{error}")
