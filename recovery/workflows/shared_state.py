"""Small JSON records every worker on every machine must agree on (circuit breakers,
degraded-mode switches), updated atomically.

Kept in Redis when there is one (``RECOVERY["SHARED_STATE_URL"]``, or the broker's URL
when the broker is Redis), otherwise in the database (``SharedState``), which is what
the embedded demo default uses. Updates are read-modify-write transactions: Redis
``WATCH``/``MULTI`` retried on conflict, or a row lock in the database. A record every
worker writes on every call (a circuit's window) can instead be changed by a Lua script
(:meth:`RedisStore.run_script`): one round trip, nothing to retry, however many writers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol

from django.apps import apps
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .. import conf

__all__ = ["Store", "RedisStore", "DatabaseStore", "store"]

KEY_PREFIX = "recovery:state:"


class Store(Protocol):
    def get(self, key: str) -> dict: ...

    def update(self, key: str, change: Callable[[dict], Any],
               expires_in: float | None = None) -> Any:
        """Apply ``change`` to the record (mutating it) atomically; return what it returns.
        ``expires_in``: the record may go that many seconds after this write (Redis drops
        it then; the database keeps it until :func:`forget` is asked to)."""

    def forget(self, key_prefix: str, unchanged_for: float) -> int:
        """Drop the records under ``key_prefix`` not written for ``unchanged_for`` seconds
        (a no-op where records expire by themselves); how many went."""


class RedisStore:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def get(self, key: str) -> dict:
        raw = self.client.get(KEY_PREFIX + key)
        return json.loads(raw) if raw else {}

    def update(self, key: str, change: Callable[[dict], Any],
               expires_in: float | None = None) -> Any:
        import redis

        name = KEY_PREFIX + key
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(name)
                    raw = pipe.get(name)
                    record = json.loads(raw) if raw else {}
                    before = dict(record)
                    result = change(record)
                    if record == before:
                        pipe.unwatch()
                        return result
                    pipe.multi()
                    pipe.set(name, json.dumps(record),
                             ex=max(1, math.ceil(expires_in)) if expires_in else None)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def forget(self, key_prefix: str, unchanged_for: float) -> int:
        return 0

    def run_script(self, source: str, key: str, *args: Any) -> Any:
        """Run the Lua ``source`` on the record ``key`` (its ``KEYS[1]``) with ``args`` as
        ``ARGV``, atomically, in one round trip (``EVALSHA``, loaded once per client)."""
        scripts = self.__dict__.setdefault("_scripts", {})
        script = scripts.get(source)
        if script is None:
            script = scripts[source] = self.client.register_script(source)
        return script(keys=[KEY_PREFIX + key], args=list(args))


def _table() -> Any:
    # Looked up when used, not imported: projects import guard() and degraded modes (which
    # sit on this module) from task modules that may load before Django has its models.
    return apps.get_model("recovery", "SharedState")


class DatabaseStore:
    def get(self, key: str) -> dict:
        row = _table().objects.filter(key=key).first()
        return dict(row.value) if row else {}

    def update(self, key: str, change: Callable[[dict], Any],
               expires_in: float | None = None) -> Any:
        with transaction.atomic():
            row, _ = _table().objects.select_for_update().get_or_create(key=key)
            record = dict(row.value or {})
            result = change(record)
            if record != row.value:
                row.value = record
                row.save(update_fields=["value", "updated_at"])
            return result

    def forget(self, key_prefix: str, unchanged_for: float) -> int:
        cutoff = timezone.now() - timedelta(seconds=unchanged_for)
        deleted, _ = _table().objects.filter(key__startswith=key_prefix,
                                             updated_at__lt=cutoff).delete()
        return deleted


def store() -> Store:
    """The configured store (Redis if one is known, else the database)."""
    url = conf.get("SHARED_STATE_URL")
    if url is None:
        broker = str(getattr(settings, "CELERY_BROKER_URL", "") or "")
        url = broker if broker.startswith(("redis://", "rediss://")) else "database"
    return _store_for(url)


@lru_cache(maxsize=8)
def _store_for(url: str) -> Store:
    return DatabaseStore() if url == "database" else RedisStore(url)
