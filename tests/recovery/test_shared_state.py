"""recovery.workflows.shared_state: which store is used, and that both real stores apply updates
atomically (no update lost between processes or threads)."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis
from django.db import connection

from recovery.workflows import shared_state
from recovery.models import SharedState
from recovery.workflows.shared_state import KEY_PREFIX, DatabaseStore, RedisStore

REDIS_URL = "redis://127.0.0.1:6379/6"


@pytest.fixture
def key():
    name = f"test:{uuid.uuid4().hex[:10]}"
    yield name
    redis.Redis.from_url(REDIS_URL).delete(KEY_PREFIX + name)


@pytest.fixture(params=["redis", pytest.param("postgres",
                                               marks=pytest.mark.django_db(transaction=True))])
def real_store(request):
    return RedisStore(REDIS_URL) if request.param == "redis" else DatabaseStore()


def test_the_broker_redis_is_used_when_no_url_is_set(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": None}
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/9"
    chosen = shared_state.store()
    assert isinstance(chosen, RedisStore)
    assert chosen.client.connection_pool.connection_kwargs["db"] == 9


def test_the_database_is_used_with_a_non_redis_broker(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": None}
    settings.CELERY_BROKER_URL = "filesystem://"
    assert isinstance(shared_state.store(), DatabaseStore)


def test_an_explicit_setting_wins_over_the_broker(settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/9"
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "database"}
    assert isinstance(shared_state.store(), DatabaseStore)
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": REDIS_URL}
    chosen = shared_state.store()
    assert isinstance(chosen, RedisStore)
    assert chosen.client.connection_pool.connection_kwargs["db"] == 6
    assert shared_state.store() is chosen  # one client (and pool) per URL


def test_a_missing_record_reads_as_empty(real_store, key):
    assert real_store.get(key) == {}


def test_update_applies_the_change_and_returns_its_result(real_store, key):
    def change(record: dict) -> int:
        record["n"] = record.get("n", 0) + 1
        return record["n"]

    assert real_store.update(key, change) == 1
    assert real_store.update(key, change) == 2
    assert real_store.get(key) == {"n": 2}


def test_an_update_that_changes_nothing_writes_nothing(key):
    store = RedisStore(REDIS_URL)
    assert store.update(key, lambda record: "seen") == "seen"
    assert not redis.Redis.from_url(REDIS_URL).exists(KEY_PREFIX + key)


@pytest.mark.django_db
def test_the_database_store_works_inside_a_callers_transaction(key):
    from django.db import transaction

    with transaction.atomic():
        DatabaseStore().update(key, lambda record: record.update(on=True))
    assert SharedState.objects.get(key=key).value == {"on": True}


def test_concurrent_increments_are_never_lost(real_store, key):
    # Given eight threads, each a separate client/connection (as separate workers are)
    def bump(record: dict) -> None:
        record["n"] = record.get("n", 0) + 1

    def worker() -> None:
        try:
            store = RedisStore(REDIS_URL) if isinstance(real_store, RedisStore) else DatabaseStore()
            for _ in range(40):
                store.update(key, bump)
        finally:
            connection.close()

    # When they all read-modify-write the same record at once
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then every increment is there
    assert real_store.get(key) == {"n": 320}
