"""Bound how long recovery's own database work can wait on a database that hangs.

A database that refuses fails fast; one that hangs (packets dropped, a stuck server or
pooler) makes a query wait forever by default: libpq sets no connect timeout and TCP
retransmits for about 15 minutes. The project owns ``DATABASES`` and the library does
not rewrite it. But a worker's main process runs only recovery's bookkeeping (the
consumer's delivery count and poison parking, the housekeeping thread's due retries,
spool, outbox and sagas), so there each thread's connection gets the libpq options the
project left unset:

* ``connect_timeout``: a connection attempt that gets no answer
  (``DB_CONNECT_TIMEOUT_SECONDS``);
* ``keepalives*`` and ``tcp_user_timeout``: an established connection whose peer
  vanished; the kernel gives up after about ``DB_NETWORK_TIMEOUT_SECONDS``;
* ``statement_timeout``: a server that is reachable but stuck (a lock, overload),
  ``DB_STATEMENT_TIMEOUT_SECONDS``; on the housekeeping thread, and on the consumer's
  when tasks run elsewhere (prefork, threads). It is enforced by the server, so it
  cannot end a wait on a server that is unreachable.

Pool children get the project's settings unchanged (``unbound_thread_connection`` runs
in each new child): a task's own queries are the project's business.

No option bounds a peer whose kernel acknowledges every byte but never answers (a stuck
proxy or pooler on the path). That is why the database work runs on its own thread
(``recovery.delivery.housekeeping``): the Redis visibility extension never waits on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections

from .. import conf

__all__ = ["bounded_options", "bound_thread_connection", "unbound_thread_connection"]

_ORIGINAL = "_recovery_unbounded_settings"


def bounded_options(options: Mapping[str, Any], *, statement: bool) -> dict[str, Any]:
    """``options`` (a PostgreSQL ``DATABASES[...]["OPTIONS"]``) with recovery's bounds
    added where the project set none; with ``statement``, a ``statement_timeout`` too."""
    result = dict(options)
    connect = conf.get("DB_CONNECT_TIMEOUT_SECONDS")
    if connect:
        # libpq takes whole seconds and treats 1 as 2.
        result.setdefault("connect_timeout", max(2, math.ceil(connect)))
    network = conf.get("DB_NETWORK_TIMEOUT_SECONDS")
    if network:
        # Keepalives detect a dead peer of an idle connection (idle + count * interval
        # <= network); tcp_user_timeout one that does not acknowledge what was sent.
        result.setdefault("keepalives", 1)
        result.setdefault("keepalives_idle", max(1, int(network // 3)))
        result.setdefault("keepalives_interval", max(1, int(network // 6)))
        result.setdefault("keepalives_count", 3)
        result.setdefault("tcp_user_timeout", int(network * 1000))
    limit = conf.get("DB_STATEMENT_TIMEOUT_SECONDS")
    given = str(result.get("options") or "")
    if statement and limit and "statement_timeout" not in given:
        result["options"] = f"{given} -c statement_timeout={int(limit * 1000)}".strip()
    return result


def bound_thread_connection(*, statement: bool, alias: str = DEFAULT_DB_ALIAS) -> bool:
    """Give this thread's connection to ``alias`` recovery's bounds (PostgreSQL only;
    not with Django's connection pool, whose connections all threads share). An open
    connection is closed: the next query connects with the bounds. Returns whether the
    bounds apply."""
    wrapper = connections[alias]
    original = getattr(wrapper, _ORIGINAL, None) or wrapper.settings_dict
    options = original.get("OPTIONS") or {}
    if wrapper.vendor != "postgresql" or options.get("pool"):
        return False
    if wrapper.connection is not None and not wrapper.in_atomic_block:
        wrapper.close()
    setattr(wrapper, _ORIGINAL, original)
    wrapper.settings_dict = {**original, "OPTIONS": bounded_options(options, statement=statement)}
    return True


def unbound_thread_connection(alias: str = DEFAULT_DB_ALIAS) -> None:
    """Give this thread's connection the project's settings back (in a pool child forked
    from the bounded main thread)."""
    wrapper = connections[alias]
    original = getattr(wrapper, _ORIGINAL, None)
    if original is not None:
        wrapper.settings_dict = original
        delattr(wrapper, _ORIGINAL)
