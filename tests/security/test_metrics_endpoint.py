"""/metrics as an attacker meets it: who may scrape, what a scrape costs the database, and how
many series a forged task name can create."""

from __future__ import annotations

import pytest
from django.core.checks import Error
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import CollectorRegistry

from recovery import checks, conf, wiring
from recovery.observe import metrics
from recovery.models import DeadLetter

pytestmark = pytest.mark.django_db

OUTSIDE = "203.0.113.7"  # TEST-NET-3: any address on the internet
TOKEN = "scrape-token-" + "s" * 40


@pytest.fixture
def recovery_settings(settings):
    def update(**values):
        settings.RECOVERY = {**settings.RECOVERY, **values}
    return update


@pytest.fixture(autouse=True)
def _no_shared_multiprocess_dir(monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(metrics.MULTIPROC_ENV.lower(), raising=False)


# -- who may scrape ---------------------------------------------------------------------------


def test_a_scrape_from_the_internet_without_a_token_is_refused(client):
    response = client.get("/metrics", REMOTE_ADDR=OUTSIDE)
    assert response.status_code == 403
    body = response.content.decode()
    assert "recovery_" not in body
    assert "METRICS_TOKEN" in body and "METRICS_ALLOWED_IPS" in body  # says what would do


def test_a_wrong_token_is_refused(client, recovery_settings):
    recovery_settings(METRICS_TOKEN=TOKEN)
    for header in (f"Bearer {TOKEN[:-1]}x", TOKEN, f"Basic {TOKEN}", "Bearer "):
        response = client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=header)
        assert response.status_code == 403, header
        assert "recovery_" not in response.content.decode()


def test_the_configured_bearer_token_scrapes_from_anywhere(client, recovery_settings):
    recovery_settings(METRICS_TOKEN=TOKEN)
    response = client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert 'recovery_collector_up{source="database"} 1.0' in response.content.decode()


def test_an_allow_listed_network_scrapes_without_a_token(client, recovery_settings):
    recovery_settings(METRICS_ALLOWED_IPS=["10.0.0.0/8", "2001:db8::/32"])
    assert client.get("/metrics", REMOTE_ADDR="10.20.30.40").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="2001:db8::7").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="11.0.0.1").status_code == 403
    # the allow-list replaces the default: loopback is no longer in it
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_a_forwarded_for_header_does_not_get_a_client_into_the_allow_list(client):
    response = client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_X_FORWARDED_FOR="127.0.0.1")
    assert response.status_code == 403


def test_by_default_only_loopback_may_scrape(client):
    assert conf.DEFAULTS["METRICS_TOKEN"] is None
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200


def test_a_bad_allow_list_or_a_short_token_fails_the_system_check(recovery_settings):
    recovery_settings(METRICS_ALLOWED_IPS=["10.0.0.0/33"], METRICS_TOKEN="short")
    problems = [p for p in checks.check_recovery_settings() if isinstance(p, Error)]
    assert [p.id for p in problems] == ["recovery.E025", "recovery.E025"]
    assert "METRICS_TOKEN" in problems[0].msg and "secrets.token_urlsafe" in problems[0].hint
    assert "'10.0.0.0/33'" in problems[1].msg


def test_a_bare_string_allow_list_fails_the_system_check(recovery_settings):
    recovery_settings(METRICS_ALLOWED_IPS="10.0.0.0/8")
    assert [p.id for p in checks.check_recovery_settings()] == ["recovery.E025"]


def test_the_workers_endpoint_listens_on_loopback_unless_told_otherwise(
        recovery_settings, monkeypatch, tmp_path):
    # Given a worker with a metrics port and no METRICS_ADDRESS of its own
    recovery_settings(METRICS_PORT=_free_port())
    conf.settings.RECOVERY = {k: v for k, v in conf.settings.RECOVERY.items()
                              if k != "METRICS_ADDRESS"}
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    try:
        # When the worker starts
        wiring._metrics_worker_init()
        # Then its endpoint is reachable from this host only
        assert metrics._server is not None
        assert metrics._server.server_address[0] == "127.0.0.1"
    finally:
        metrics.stop_worker_server()
        monkeypatch.delenv(metrics.MULTIPROC_ENV)
        metrics._reset()  # later tests count in this process's memory again


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- what a scrape costs ----------------------------------------------------------------------


def test_two_scrapes_within_the_cache_window_cost_one_set_of_queries(client, recovery_settings):
    recovery_settings(METRICS_CACHE_SECONDS=30)
    DeadLetter.objects.create(task_id="c-1", task_name="proj.t", kind="dependency",
                              fingerprint="f" * 40)
    with CaptureQueriesContext(connection) as first:
        assert 'recovery_dead_letters{status="parked"} 1.0' in client.get("/metrics").content.decode()
    assert len(first.captured_queries) > 0
    with CaptureQueriesContext(connection) as second:
        text = client.get("/metrics").content.decode()
    assert second.captured_queries == []
    assert 'recovery_dead_letters{status="parked"} 1.0' in text


@pytest.mark.django_db(transaction=True)
def test_no_scrape_query_reads_the_whole_dead_letter_table(client, recovery_settings):
    # Given a large table: 300,000 letters, nearly all closed, a few hundred parked
    recovery_settings(METRICS_CACHE_SECONDS=0)
    with connection.cursor() as cursor:
        cursor.execute("""
            INSERT INTO recovery_deadletter (task_id, task_name, args, kwargs, headers, queue,
                status, kind, reason, exception_type, exception_message, traceback,
                fingerprint, history, attempts, first_failed_at, last_failed_at, replay_count,
                raw_body, content_type, permanent, worker, created_at, updated_at)
            SELECT 'big-' || n, 'proj.t', '[]', '{}', '{}', 'celery',
                   CASE WHEN n % 1000 = 0 THEN 'parked' WHEN n % 3 = 0 THEN 'discarded'
                        ELSE 'resolved' END,
                   'dependency', '', 'E', '', '', repeat('f', 40), '[]', 1,
                   now() - n * interval '1 second', now() - n * interval '1 second', 0,
                   '', '', true, '', now(), now()
            FROM generate_series(1, 300000) AS n""")
        cursor.execute("ANALYZE recovery_deadletter")
    # When Prometheus scrapes
    with CaptureQueriesContext(connection) as scrape:
        text = client.get("/metrics").content.decode()
    assert 'recovery_dead_letters{status="parked"} 300.0' in text
    # Then no query it ran scans the dead-letter table from end to end
    plans = []
    with connection.cursor() as cursor:
        for query in scrape.captured_queries:
            if "recovery_deadletter" not in query["sql"]:
                continue
            cursor.execute("EXPLAIN " + query["sql"])
            plans.append((query["sql"], "\n".join(row[0] for row in cursor.fetchall())))
    assert plans
    for sql, plan in plans:
        assert "Seq Scan on recovery_deadletter" not in plan, f"{sql}\n{plan}"


# -- label cardinality ------------------------------------------------------------------------


def test_ten_thousand_forged_task_names_make_one_series(monkeypatch):
    # Given a real registry in this process
    metrics._reset()
    # When letters of 10,000 distinct task names no worker knows are parked
    for n in range(10_000):
        metrics.dead_letter_parked(f"forged.task_{n}", "poison")
        metrics.internal_error(f"forged.task_{n}", "DecodeError")
    # Then they share one label value per metric
    registry: CollectorRegistry = metrics.registry()
    for family_name in ("recovery_dead_letters_parked", "recovery_internal_errors"):
        family = next(f for f in registry.collect() if f.name == family_name)
        tasks = {s.labels["task"] for s in family.samples if s.name.endswith("_total")}
        assert tasks == {"unregistered"}, family_name
    assert registry.get_sample_value("recovery_dead_letters_parked_total",
                                     {"task": "unregistered", "kind": "poison"}) == 10_000


def test_a_registered_task_keeps_its_own_label():
    from celery import current_app

    metrics._reset()
    name = next(n for n in current_app.tasks if not n.startswith("celery."))
    metrics.dead_letter_parked(name, "dependency")
    assert metrics.registry().get_sample_value(
        "recovery_dead_letters_parked_total", {"task": name, "kind": "dependency"}) == 1
