"""recovery.store.db_timeouts: the bounds recovery gives its own connections, and only those."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, connections
from django.test import override_settings

from recovery.store.db_timeouts import (bound_thread_connection, bounded_options, unbound_thread_connection)


def test_bounds_are_added_only_where_the_project_set_none():
    options = bounded_options({"connect_timeout": 3, "options": "-c search_path=app"},
                              statement=True)
    assert options["connect_timeout"] == 3
    assert options["options"] == "-c search_path=app -c statement_timeout=30000"
    assert options["tcp_user_timeout"] == 15000
    assert options["keepalives"] == 1
    assert options["keepalives_idle"] + options["keepalives_count"] * \
        options["keepalives_interval"] <= 15


def test_without_statement_no_statement_timeout_and_none_turns_a_bound_off():
    with override_settings(RECOVERY={"DB_NETWORK_TIMEOUT_SECONDS": None,
                                     "DB_CONNECT_TIMEOUT_SECONDS": 1.2}):
        options = bounded_options({}, statement=False)
    assert options == {"connect_timeout": 2}


@pytest.mark.django_db(transaction=True)
def test_a_bounded_thread_gets_the_timeouts_and_other_threads_keep_the_projects():
    seen = {}

    def housekeeping_thread():
        try:
            assert bound_thread_connection(statement=True)
            with connection.cursor() as cursor:
                cursor.execute("SHOW statement_timeout")
                seen["bounded"] = cursor.fetchone()[0]
            unbound_thread_connection()
            connection.close()
            with connection.cursor() as cursor:
                cursor.execute("SHOW statement_timeout")
                seen["unbound"] = cursor.fetchone()[0]
        finally:
            connections.close_all()

    worker = threading.Thread(target=housekeeping_thread)
    worker.start()
    worker.join(30)
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "0"
    assert seen == {"bounded": "30s", "unbound": "0"}
    assert "tcp_user_timeout" not in connection.settings_dict["OPTIONS"]
