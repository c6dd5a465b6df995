"""What a task message must look like before it runs (pure checks, no services)."""

from __future__ import annotations

import pytest

from recovery.core import headers as hdr
from recovery.core.envelope import MAX_ID_CHARS, problem

GOOD_ID = "0b7c9a4e-6d43-4f0e-9a55-2f1f2f0c1e11"


def check(task_id=GOOD_ID, headers=None, body_bytes=100, max_body_bytes=4 * 1024 * 1024):
    return problem(task_id=task_id, headers=headers, body_bytes=body_bytes,
                   max_body_bytes=max_body_bytes)


def test_an_ordinary_message_passes():
    assert check() is None
    assert check(headers={hdr.HISTORY: [{"attempt": 1, "delay_seconds": 2.5}],
                          hdr.STARTED_AT: 1733390000.5, hdr.REPLAY: 1,
                          hdr.POLICY: {"max_attempts": 3}, hdr.SAGA: {"run": 1}}) is None


def test_a_task_id_no_column_can_hold_is_refused_naming_the_id():
    assert "task id is 256 characters long" in check(task_id="x" * (MAX_ID_CHARS + 1))
    assert check(task_id="x" * MAX_ID_CHARS) is None
    assert "task id contains a NUL" in check(task_id="abc\x00def")
    assert "task id is not a non-empty string" in check(task_id="")
    assert "task id is not a non-empty string" in check(task_id=None)


def test_a_body_over_the_limit_is_refused_with_both_sizes():
    reason = check(body_bytes=5 * 1024 * 1024)
    assert "too large: 5.0 MiB, over the limit of 4.0 MiB" in reason
    assert check(body_bytes=4 * 1024 * 1024) is None
    assert check(body_bytes=50 * 1024 * 1024, max_body_bytes=None) is None


@pytest.mark.parametrize("headers, named", [
    ({hdr.HISTORY: "'; DROP TABLE recovery_deadletter; --"}, hdr.HISTORY),
    ({hdr.HISTORY: [1, "two", None, [3]]}, hdr.HISTORY),
    ({hdr.HISTORY: [{"delay_seconds": "soon"}]}, hdr.HISTORY),
    ({hdr.STARTED_AT: "yesterday"}, hdr.STARTED_AT),
    ({hdr.REPLAY: -1}, hdr.REPLAY),
    ({hdr.REPLAY: "1"}, hdr.REPLAY),
    ({hdr.POLICY: ["max_attempts", 99]}, hdr.POLICY),
    ({hdr.SAGA: "run-1"}, hdr.SAGA),
    ({"headers": {hdr.HISTORY: "nested"}}, hdr.HISTORY),
])
def test_a_forged_recovery_header_is_refused_naming_the_header(headers, named):
    reason = check(headers=headers)
    assert reason is not None and f"forged or corrupt {named} header" in reason
