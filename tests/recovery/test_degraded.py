"""recovery.workflows.degraded: operators flip named modes, code checks them, an unreadable store
means "off"."""

from __future__ import annotations

import pytest
import redis

from recovery.workflows import degraded
from recovery.workflows.shared_state import KEY_PREFIX

REDIS_URL = "redis://127.0.0.1:6379/6"


@pytest.fixture(params=["redis", pytest.param("database", marks=pytest.mark.django_db)])
def state(request, settings):
    url = REDIS_URL if request.param == "redis" else "database"
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": url}
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(KEY_PREFIX + degraded.MODES_KEY)
    yield request.param
    client.delete(KEY_PREFIX + degraded.MODES_KEY)


def test_a_mode_never_switched_is_off(state):
    assert degraded.is_on("read-only") is False
    assert degraded.status() == {}


def test_switching_a_mode_on_and_off_is_seen_with_who_and_why(state):
    entry = degraded.switch("read-only", True, actor="alice", reason="database failover")
    assert entry["on"] is True and entry["actor"] == "alice"
    assert degraded.is_on("read-only") is True
    assert degraded.is_on("no-email") is False  # modes are independent
    degraded.switch("no-email", True)
    degraded.switch("read-only", False, actor="bob", reason="failover done")
    assert degraded.is_on("read-only") is False and degraded.is_on("no-email") is True
    status = degraded.status()
    assert set(status) == {"read-only", "no-email"}
    assert status["read-only"]["actor"] == "bob" and status["read-only"]["reason"] == "failover done"
    assert status["read-only"]["since"]


def test_an_unreadable_store_counts_as_off(settings, caplog):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "redis://127.0.0.1:1/0"}
    assert degraded.is_on("read-only") is False
    assert "treating it as off" in caplog.text


def test_switching_with_an_unreachable_store_tells_the_operator(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "redis://127.0.0.1:1/0"}
    with pytest.raises(redis.ConnectionError):
        degraded.switch("read-only", True)
