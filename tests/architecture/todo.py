"""How an architecture test fails: a heading and one line per offence, nothing else.

These tests fail while the code still breaks a rule, and the lead works down their
messages as a to-do list; pytest's repr of the offending objects and the traceback would
only bury the lines that matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest


def expect_none(offences: Sequence[object], heading: str) -> None:
    """Fail, listing ``offences`` under ``heading``, unless there are none."""
    if offences:
        lines = "\n".join(f"  {offence}" for offence in offences)
        pytest.fail(f"{heading} ({len(offences)}):\n{lines}", pytrace=False)
