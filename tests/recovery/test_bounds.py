"""recovery.core.bounds: pure functions, no database; and who reads a bounded letter."""

from __future__ import annotations

from recovery.core import bounds
from recovery.observe.escalation import letter_diagnostics
from recovery.store.parking import ParkRecord


def test_cut_keeps_short_text_and_says_how_much_it_cut_from_long_text():
    assert bounds.cut("short", 100) == "short"
    text = bounds.cut("x" * 1000, 100, "why")
    assert len(text) <= 100 and text.endswith("chars cut: why]")
    assert f"[{1000 - text.index('...')} chars cut" in text


def test_a_long_history_keeps_the_first_and_last_attempts_and_counts_the_rest():
    history = [{"attempt": n, "replay": 2} for n in range(1, 1001)]
    kept = bounds.bounded_history(history, 2000)
    first, last = bounds.HISTORY_KEEP_FIRST, bounds.HISTORY_KEEP_LAST
    assert len(kept) == first + 1 + last
    assert kept[first]["dropped"] == 1000 - first - last and kept[first]["replay"] == 2
    assert kept[-1]["attempt"] == 1000
    assert bounds.attempt_count(kept) == 1000
    assert bounds.bounded_history(kept, 2000) == kept  # idempotent (a drained spool record)


def test_forged_attempt_records_keep_their_known_fields_with_plain_types():
    [entry] = bounds.bounded_history(
        [{"attempt": "3", "replay": [1], "delay_seconds": "nan", "at": {"x": 1},
          "exception_message": "m" * 5000, "evil": "dropped"}], 100)
    assert entry["attempt"] == 3 and entry["replay"] is None
    assert entry["delay_seconds"] is None and entry["at"] == '{"x": 1}'
    assert len(entry["exception_message"]) <= 100 and "evil" not in entry
    assert bounds.bounded_history("not a list", 100) == [{"exception_message": "not a list"}]


def test_arguments_are_kept_whole_up_to_the_limit_and_the_body_always():
    assert bounds.bounded_payload([1], {"a": "b"}, "[[1]]", 100) == ([1], {"a": "b"}, "[[1]]")
    args, kwargs, raw = bounds.bounded_payload(["x" * 500], {}, "y" * 5000, 100)
    assert (args, kwargs) == ([], {})
    assert raw == "y" * 5000  # the only copy of a refused message
    assert bounds.bounded_payload(["x" * 500], {}, "", None)[0] == ["x" * 500]


def test_an_oversized_option_or_header_value_is_replaced_by_its_size():
    big = ["h"] * 10_000
    headers = bounds.bounded_headers({"queue": "celery", "recovery_history": big,
                                      "headers": {"recovery_saga": {"run": 1}, "x": big}})
    assert headers["queue"] == "celery" and headers["headers"]["recovery_saga"] == {"run": 1}
    assert headers["recovery_history"].endswith("chars not stored: over 8192]")
    assert headers["headers"]["x"].startswith("[50000 chars")


def test_escalations_count_the_attempts_a_bounded_history_left_out():
    record = ParkRecord(task_id="t-1", task_name="shop.charge", kind="dependency", reason="r",
                        history=[{"attempt": n} for n in range(1, 501)])
    assert len(record.history) == bounds.HISTORY_KEEP_FIRST + 1 + bounds.HISTORY_KEEP_LAST
    assert letter_diagnostics(record, None)["attempts"] == 500
