"""Fakes for the Kafka client boundary of ``recovery.store.kafka``, and nothing deeper.

No Kafka broker can run where these tests run. :class:`FakeProducer` stands where
``confluent_kafka.Producer`` stands (``produce``, ``poll``, ``flush``) and keeps every
record it is given; :class:`FakeConsumer` stands where ``_ConfluentConsumer`` stands
(``subscribe``, ``consume``, ``commit``, ``close``) and serves records shaped like
``confluent_kafka.Message``: keys, values, headers, partitions, offsets and errors, with
the end-of-partition events confluent-kafka sends when ``enable.partition.eof`` is on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PARTITION_EOF = -191  # confluent_kafka.KafkaError._PARTITION_EOF


class FakeError:
    """A ``confluent_kafka.KafkaError``: a code, a text, fatal or not."""

    def __init__(self, code: int, text: str = "", fatal: bool = False) -> None:
        self._code, self._text, self._fatal = code, text or f"error {code}", fatal

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return self._fatal

    def __str__(self) -> str:
        return self._text


@dataclass
class FakeMessage:
    """A ``confluent_kafka.Message``."""

    partition_: int = 0
    offset_: int = 0
    key_: bytes | None = None
    value_: bytes | None = None
    headers_: list[tuple[str, bytes]] | None = None
    error_: FakeError | None = None
    topic_: str = "letters.DLT"

    def error(self) -> FakeError | None:
        return self.error_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.headers_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def topic(self) -> str:
        return self.topic_


def eof(partition: int, offset: int = 0) -> FakeMessage:
    return FakeMessage(partition_=partition, offset_=offset,
                       error_=FakeError(PARTITION_EOF, "Broker: No more messages"))


@dataclass
class Produced:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class FakeProducer:
    """Keeps what is produced; reports each delivery at the next ``poll``/``flush``.

    ``fail(key)`` returns an error to report for that record (a delivery that failed);
    ``refuse(key)`` an exception ``produce`` raises (the client refused it); keys in
    ``lose`` are never reported (still queued when ``flush`` gives up).
    """

    def __init__(self, *, fail: Callable[[bytes], Any] = lambda key: None,
                 refuse: Callable[[bytes], Exception | None] = lambda key: None,
                 lose: Iterable[bytes] = ()) -> None:
        self.produced: list[Produced] = []
        self.flushed: list[float] = []
        self._fail, self._refuse, self._lose = fail, refuse, set(lose)
        self._pending: list[tuple[Callable, bytes]] = []

    def produce(self, topic: str, *, key: bytes, value: bytes, headers: list[tuple[str, bytes]],
                on_delivery: Callable[[Any, Any], None]) -> None:
        refused = self._refuse(key)
        if refused is not None:
            raise refused
        self.produced.append(Produced(topic, key, value, list(headers)))
        self._pending.append((on_delivery, key))

    def poll(self, timeout: float) -> int:
        served = 0
        for on_delivery, key in list(self._pending):
            if key in self._lose:
                continue
            self._pending.remove((on_delivery, key))
            on_delivery(self._fail(key), None)
            served += 1
        return served

    def flush(self, timeout: float) -> int:
        self.flushed.append(timeout)
        self.poll(timeout)
        return len(self._pending)


def partition_of(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


def as_topic(produced: Iterable[Produced], partitions: int = 2) -> list[FakeMessage]:
    """What a topic of ``partitions`` partitions holds after ``produced``: each record in
    its key's partition, at the next offset there."""
    next_offset = [0] * partitions
    messages = []
    for record in produced:
        partition = partition_of(record.key, partitions)
        messages.append(FakeMessage(partition_=partition, offset_=next_offset[partition],
                                    key_=record.key, value_=record.value,
                                    headers_=list(record.headers), topic_=record.topic))
        next_offset[partition] += 1
    return messages


@dataclass
class FakeConsumer:
    """Serves ``messages`` (at most ``batch`` per ``consume``), then, when ``eof``, one
    end-of-partition event per assigned partition; ``commit`` calls ``on_commit`` and keeps
    the offsets. ``partitions`` is what the group assigns (at the first ``consume``)."""

    messages: list[FakeMessage]
    partitions: tuple[int, ...] = (0, 1)
    batch: int = 1000
    eof: bool = True
    on_commit: Callable[[Mapping[int, int]], None] | None = None
    commit_error: Exception | None = None
    commits: list[dict[int, int]] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    closed: bool = False
    consumed_counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queue = list(self.messages)
        self._on_assign: Callable[[list[int]], None] | None = None
        self._assigned = False
        self._eof_sent = False

    def subscribe(self, topic: str, on_assign: Callable[[list[int]], None]) -> None:
        self.subscribed.append(topic)
        self._on_assign = on_assign

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        self.consumed_counts.append(count)
        if not self._assigned and self._on_assign is not None:
            self._assigned = True
            self._on_assign(list(self.partitions))
        served, self._queue = self._queue[:min(count, self.batch)], self._queue[min(count, self.batch):]
        if not self._queue and self.eof and not self._eof_sent and len(served) < count:
            self._eof_sent = True
            served += [eof(p) for p in self.partitions]
        return served

    def commit(self, offsets: Mapping[int, int]) -> None:
        if self.on_commit is not None:
            self.on_commit(offsets)
        if self.commit_error is not None:
            raise self.commit_error
        self.commits.append(dict(offsets))

    def close(self) -> None:
        self.closed = True

    @property
    def committed(self) -> dict[int, int]:
        """The last committed offset of each partition."""
        last: dict[int, int] = {}
        for commit in self.commits:
            last.update(commit)
        return last
