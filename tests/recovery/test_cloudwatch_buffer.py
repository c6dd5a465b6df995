"""recovery.observe.cloudwatch.buffer: counts are summed, published by the buffer's own
thread on its timer or when full, kept when the publisher fails, and published at stop."""

from __future__ import annotations

import threading
import time

import pytest

from recovery.observe.cloudwatch import families
from recovery.observe.cloudwatch.buffer import THREAD_NAME, Buffer
from recovery.observe.cloudwatch.emf import Unsent

CHARGE = (families.RETRIES, ("shop.charge", "dependency", "celery"))
EMAIL = (families.RETRIES, ("shop.email", "timeout", "celery"))


class Recorder:
    """A publisher that remembers each flush, and the thread that made it."""

    def __init__(self, fail: int = 0) -> None:
        self.flushes: list[tuple[dict, float, str]] = []
        self.fail = fail
        self.published = threading.Event()

    def __call__(self, counts, at):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("CloudWatch unreachable")
        self.flushes.append((dict(counts), at, threading.current_thread().name))
        self.published.set()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_of_one_series_are_summed_and_published_once_with_the_time_of_the_first():
    recorder, clock = Recorder(), Clock()
    buffer = Buffer(recorder, interval_seconds=3600, max_series=100, clock=clock)

    buffer.add(CHARGE)
    clock.now += 5
    buffer.add(CHARGE, 2)
    buffer.add(EMAIL)

    assert recorder.flushes == []  # nothing until the interval, a flush or the stop
    assert buffer.flush() == 2
    assert recorder.flushes == [({CHARGE: 3.0, EMAIL: 1.0}, 1000.0, threading.current_thread().name)]
    assert buffer.flush() == 0
    buffer.stop(timeout=1)


def test_the_buffers_own_thread_publishes_on_its_timer_never_the_callers():
    recorder = Recorder()
    buffer = Buffer(recorder, interval_seconds=0.05, max_series=100)

    buffer.add(CHARGE)

    assert recorder.published.wait(5)
    assert recorder.flushes[0][0] == {CHARGE: 1.0}
    assert recorder.flushes[0][2] == THREAD_NAME
    buffer.stop(timeout=1)


def test_a_full_buffer_is_published_before_its_interval():
    recorder = Recorder()
    buffer = Buffer(recorder, interval_seconds=3600, max_series=2)

    buffer.add(CHARGE)
    buffer.add(EMAIL)  # the second series fills it

    assert recorder.published.wait(5)
    assert recorder.flushes[0][0] == {CHARGE: 1.0, EMAIL: 1.0}
    buffer.stop(timeout=1)


def test_counts_a_failed_publish_did_not_send_wait_for_the_next_flush():
    recorder, clock = Recorder(fail=1), Clock()
    buffer = Buffer(recorder, interval_seconds=3600, max_series=100, clock=clock)
    buffer.add(CHARGE)

    with pytest.raises(ConnectionError):
        buffer.flush()
    clock.now += 10
    buffer.add(CHARGE)

    assert buffer.flush() == 1
    assert recorder.flushes[0][:2] == ({CHARGE: 2.0}, 1000.0)
    buffer.stop(timeout=1)


def test_a_partly_sent_flush_keeps_only_what_was_not_sent():
    sent = []

    def publish(counts, at):
        sent.append(dict(counts))
        if len(sent) == 1:
            raise Unsent("second request failed", {EMAIL: counts[EMAIL]})

    buffer = Buffer(publish, interval_seconds=3600, max_series=100)
    buffer.add(CHARGE)
    buffer.add(EMAIL, 4)

    with pytest.raises(Unsent):
        buffer.flush()

    assert buffer.pending() == {EMAIL: 4.0}
    buffer.flush()
    assert sent[-1] == {EMAIL: 4.0}
    buffer.stop(timeout=1)


def test_what_cannot_be_kept_past_the_bound_is_dropped_and_said(caplog):
    buffer = Buffer(Recorder(fail=1), interval_seconds=3600, max_series=1)
    buffer._counts = {CHARGE: 1.0, EMAIL: 1.0}  # two series waiting, one may be kept

    with pytest.raises(ConnectionError):
        buffer.flush()

    assert len(buffer.pending()) == 1
    assert "dropped 1 CloudWatch metric series" in caplog.text


def test_stop_publishes_what_is_left_and_ends_the_thread():
    recorder = Recorder()
    buffer = Buffer(recorder, interval_seconds=3600, max_series=100)
    buffer.add(CHARGE)
    thread = buffer._thread

    buffer.stop(timeout=5)

    assert recorder.flushes[0][0] == {CHARGE: 1.0}
    assert not thread.is_alive()


def test_a_failing_publisher_never_kills_the_thread(caplog):
    recorder = Recorder(fail=2)
    buffer = Buffer(recorder, interval_seconds=0.05, max_series=100)

    buffer.add(CHARGE)

    assert recorder.published.wait(5)  # the third flush succeeded, with the kept count
    assert recorder.flushes[0][0] == {CHARGE: 1.0}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"
                and "could not publish CloudWatch metrics" in r.getMessage()]
    assert len(warnings) == 1  # the second failure is logged at debug level
    buffer.stop(timeout=1)


def test_an_interval_of_zero_publishes_each_count_at_once_in_the_callers_thread():
    recorder = Recorder()
    buffer = Buffer(recorder, interval_seconds=0, max_series=100, clock=Clock(7.0))

    buffer.add(CHARGE)
    buffer.add(CHARGE)

    assert [flush[:2] for flush in recorder.flushes] == [({CHARGE: 1.0}, 7.0)] * 2
    assert buffer._thread is None


def test_adding_takes_no_time_while_the_publisher_is_slow():
    release = threading.Event()

    def slow(counts, at):
        release.wait(10)

    buffer = Buffer(slow, interval_seconds=0.01, max_series=100)
    buffer.add(CHARGE)
    time.sleep(0.1)  # the thread is now inside the slow publish

    started = time.monotonic()
    for _ in range(1000):
        buffer.add(EMAIL)
    elapsed = time.monotonic() - started

    release.set()
    buffer.stop(timeout=5)
    assert elapsed < 0.5
