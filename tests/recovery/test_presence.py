"""recovery.delivery.presence on the test Redis (the shared state): which workers count as alive.

The bootstep on a real worker, and a sweep that hears nothing from a stopped one, are in
``tests/integration/test_watchdog.py``.
"""

from __future__ import annotations

import pytest

from recovery.delivery import presence

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_shared_state(broker, settings):
    settings.RECOVERY = {**settings.RECOVERY, "HEARTBEAT_INTERVAL_SECONDS": 10.0}


def test_a_worker_is_alive_for_three_heartbeats_after_its_last_stamp():
    presence.beat("a@h", now=1000.0)
    presence.beat("b@h", now=1015.0)
    assert presence.alive(now=1030.0) == {"a@h", "b@h"}
    assert presence.alive(now=1030.1) == {"b@h"}


def test_a_worker_that_stops_cleanly_is_not_expected_to_answer():
    presence.beat("a@h", now=1000.0)
    presence.beat("b@h", now=1000.0)
    presence.leave("a@h")
    presence.leave("never-seen@h")
    assert presence.alive(now=1001.0) == {"b@h"}


def test_stamps_of_workers_long_gone_are_forgotten():
    presence.beat("gone@h", now=1000.0)
    presence.beat("a@h", now=1000.0 + 100 * 10.0 + 1)
    assert set(presence.store().get(presence.KEY)) == {"a@h"}
