"""recovery.observe.metrics in one process: the right counter moves with the right labels, the
database backlogs are read at scrape time, and a broken exporter never stops a park."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from celery import Celery
from django.utils import timezone

from recovery import RecoveryTask, RetryPolicy
from recovery.observe import metrics
from recovery.workflows import shared_state
from recovery.operations import replay as service
from recovery.workflows.circuit import Circuit, CircuitPolicy
from recovery.core.errors import DependencyError, PermanentError
from recovery.models import DeadLetter, DueRetry, OutboxMessage
from recovery.store.parking import ParkRecord, park
from recovery.workflows.shared_state import KEY_PREFIX, DatabaseStore

pytestmark = pytest.mark.django_db(transaction=True)


def sample(name: str, **labels: str) -> float:
    """A sample's current value in this process's exposition (0 when absent)."""
    value = metrics.registry().get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(metrics.MULTIPROC_ENV.lower(), raising=False)


@pytest.fixture
def app():
    app = Celery("metrics", set_as_current=False)
    app.conf.task_always_eager = True
    return app


def record(task_id: str = "m-1", **overrides) -> ParkRecord:
    values = dict(task_id=task_id, task_name="proj.charge", kind="dependency",
                  reason="gave up", exception_type="recovery.errors.DependencyError",
                  exception_message="503")
    values.update(overrides)
    return ParkRecord(**values)


def test_transient_failures_count_each_attempt_each_retry_and_one_parked_letter(app):
    @app.task(base=RecoveryTask, bind=True, name="metrics.always_down",
              retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=5))
    def always_down(self):
        raise DependencyError("503 from the partner")

    labels = {"task": "metrics.always_down", "kind": "dependency"}
    before = (sample("recovery_task_failures_total", transient="true", **labels),
              sample("recovery_retries_total", **labels),
              sample("recovery_dead_letters_parked_total", **labels))

    result = always_down.apply()

    assert result.failed()
    assert DeadLetter.objects.get(task_id=result.id).attempts == 3
    assert sample("recovery_task_failures_total", transient="true", **labels) - before[0] == 3
    assert sample("recovery_retries_total", **labels) - before[1] == 2
    assert sample("recovery_dead_letters_parked_total", **labels) - before[2] == 1
    assert sample("recovery_task_failures_total", transient="false", **labels) == 0


def test_a_permanent_failure_counts_as_not_transient_and_is_never_retried(app):
    @app.task(base=RecoveryTask, bind=True, name="metrics.bad_input")
    def bad_input(self):
        raise PermanentError("no such customer")

    labels = {"task": "metrics.bad_input", "kind": "other"}
    bad_input.apply()

    assert DeadLetter.objects.filter(task_name="metrics.bad_input").count() == 1
    kind = DeadLetter.objects.get(task_name="metrics.bad_input").kind
    labels["kind"] = kind
    assert sample("recovery_task_failures_total", transient="false", **labels) == 1
    assert sample("recovery_retries_total", **labels) == 0
    assert sample("recovery_dead_letters_parked_total", **labels) == 1


def test_a_fallback_that_stands_in_is_counted_with_its_reason(app):
    @app.task(base=RecoveryTask, bind=True, name="metrics.quote",
              retry_policy=RetryPolicy(max_attempts=1), fallback=lambda: "cached")
    def quote(self):
        raise DependencyError("503")

    before = sample("recovery_fallbacks_total", task="metrics.quote", reason="gave_up")
    assert quote.apply().get() == "cached"
    assert sample("recovery_fallbacks_total", task="metrics.quote", reason="gave_up") - before == 1
    assert not DeadLetter.objects.filter(task_name="metrics.quote").exists()


def test_a_failing_fallback_is_counted_and_the_task_parked(app):
    def broken_fallback():
        raise RuntimeError("cache down too")

    @app.task(base=RecoveryTask, bind=True, name="metrics.quote_no_cache",
              retry_policy=RetryPolicy(max_attempts=1), fallback=broken_fallback)
    def quote(self):
        raise DependencyError("503")

    quote.apply()
    assert sample("recovery_fallback_failures_total", task="metrics.quote_no_cache",
                  reason="gave_up") == 1
    assert sample("recovery_fallbacks_total", task="metrics.quote_no_cache", reason="gave_up") == 0
    assert DeadLetter.objects.filter(task_name="metrics.quote_no_cache").count() == 1


def test_a_broken_exporter_never_stops_a_letter_from_being_parked(monkeypatch, app):
    def explode(key):
        raise RuntimeError("exporter is broken")

    monkeypatch.setattr(metrics, "_metric", explode)

    outcome = park(record("m-broken"))
    assert outcome.letter_id is not None
    assert DeadLetter.objects.filter(task_id="m-broken").count() == 1

    @app.task(base=RecoveryTask, bind=True, name="metrics.doomed",
              retry_policy=RetryPolicy(max_attempts=2, initial_delay_seconds=1))
    def doomed(self):
        raise DependencyError("503")

    result = doomed.apply()
    assert result.failed()
    assert DeadLetter.objects.get(task_id=result.id).attempts == 2


def test_a_letter_parked_again_after_a_replay_counts_as_a_replay_outcome():
    before = sample("recovery_replays_total", outcome="parked_again")
    park(record("m-replayed", replay=1))
    park(record("m-first"))
    assert sample("recovery_replays_total", outcome="parked_again") - before == 1


def test_replay_publish_failure_and_success_are_counted(monkeypatch, broker):
    from config.celery import app as celery_app

    letter = DeadLetter.objects.create(
        task_id="m-replay", task_name="tasks.tasks.charge_payment", args=[1, 500], kwargs={},
        kind="dependency", fingerprint="f" * 40, queue="celery")
    published = sample("recovery_replays_total", outcome="published")
    failed = sample("recovery_replays_total", outcome="failed")
    resolved = sample("recovery_replays_total", outcome="resolved")

    service.replay(letter, app=celery_app)
    assert sample("recovery_replays_total", outcome="published") - published == 1

    assert service.mark_replay_succeeded("m-replay") == 1
    assert sample("recovery_replays_total", outcome="resolved") - resolved == 1

    other = DeadLetter.objects.create(
        task_id="m-replay-2", task_name="tasks.tasks.charge_payment", args=[2, 500], kwargs={},
        kind="dependency", fingerprint="f" * 40, queue="celery")

    def no_broker(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr("celery.canvas.Signature.apply_async", no_broker)
    with pytest.raises(service.ReplayError):
        service.replay(other, app=celery_app)
    assert sample("recovery_replays_total", outcome="failed") - failed == 1


def test_circuit_changes_set_the_state_gauge_and_count_transitions():
    breaker = Circuit("metrics-partner", store=DatabaseStore())
    breaker.trip(seconds=60)
    assert sample("recovery_circuit_state", dependency="metrics-partner") == 2
    breaker.reset()
    assert sample("recovery_circuit_state", dependency="metrics-partner") == 0
    assert sample("recovery_circuit_transitions_total", dependency="metrics-partner",
                  state="open") == 1
    assert sample("recovery_circuit_transitions_total", dependency="metrics-partner",
                  state="closed") == 1


# -- the circuits' shared state, read by the Django view ------------------------------------------


def scraped(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one metric in an exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


@pytest.fixture(params=["redis", "database"])
def shared_circuit(request, settings):
    """Names of circuits on the shared state of this test run: its own Redis db
    (TEST_BROKER_URL) or the database; their Redis records are removed afterwards."""
    import uuid

    import redis

    url = settings.CELERY_BROKER_URL if request.param == "redis" else "database"
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": url}
    names: list[str] = []

    def name(prefix: str) -> str:
        names.append(f"{prefix}-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield name
    if request.param == "redis":
        client = redis.Redis.from_url(url)
        client.delete(*[f"{KEY_PREFIX}circuit:{value}" for value in names] or ["-"])


def test_the_view_shows_each_circuits_shared_state_whichever_worker_changed_it(
        client, settings, shared_circuit):
    # Given a circuit tripped by hand (known only by its record in the store), one
    # half-open after its open time, one configured but never used, and one that another
    # worker closed after this process saw it open
    tripped, trial, configured, closed = (shared_circuit(p) for p in
                                          ("tripped", "trial", "configured", "closed"))
    settings.RECOVERY = {**settings.RECOVERY, "CIRCUITS": {configured: {}, "default": {}}}
    Circuit(tripped).trip(seconds=600)
    clock = [time.time()]
    Circuit(trial, CircuitPolicy(open_seconds=1), clock=lambda: clock[0]).trip()
    clock[0] += 2
    assert Circuit(trial, CircuitPolicy(open_seconds=1), clock=lambda: clock[0]).allow().trial
    Circuit(closed).trip()
    shared_state.store().update(f"circuit:{closed}", lambda record: record.update(state="closed"))

    # When Prometheus scrapes the Django view
    response = client.get("/metrics")

    # Then each circuit's gauge says what every worker obeys
    assert response.status_code == 200
    text = response.content.decode()
    status = scraped(text, "recovery_circuit_status")
    assert status[(("dependency", tripped),)] == 2
    assert status[(("dependency", trial),)] == 1
    assert status[(("dependency", configured),)] == 0
    assert status[(("dependency", closed),)] == 0
    # ... with the circuits the registered tasks declare, configured or not
    assert (("dependency", "partner-api"),) in status
    assert ("default",) not in {value for key in status for _, value in key}
    assert scraped(text, "recovery_collector_up")[(("source", "shared_state"),)] == 1
    # ... while this process's own gauge still says the last change it made: open
    assert scraped(text, "recovery_circuit_state")[(("dependency", closed),)] == 2


def test_the_view_still_answers_when_the_shared_state_cannot_be_read(client, settings):
    # Given a shared-state Redis that refuses connections
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "redis://127.0.0.1:1/0"}

    # When Prometheus scrapes the Django view
    response = client.get("/metrics")

    # Then it answers, without circuit states, and says which source it could not read
    assert response.status_code == 200
    text = response.content.decode()
    assert scraped(text, "recovery_circuit_status") == {}
    up = scraped(text, "recovery_collector_up")
    assert up[(("source", "shared_state"),)] == 0
    assert up[(("source", "database"),)] == 1


def test_workers_endpoints_do_not_read_the_shared_circuit_state():
    body, _content_type = metrics.exposition()
    text = body.decode()
    assert "recovery_circuit_status" not in text
    assert "shared_state" not in text


def test_the_view_reads_backlogs_from_the_database_at_scrape_time(client, settings, tmp_path):
    # Given two parked letters (the oldest an hour ago), one resolved, one outbox intent,
    # one due retry, one spooled letter and one quarantined record
    now = timezone.now()
    for n, (status, failed) in enumerate([("parked", now - timedelta(hours=1)),
                                          ("parked", now), ("resolved", now)]):
        DeadLetter.objects.create(task_id=f"v-{n}", task_name="proj.t", status=status,
                                  kind="dependency", fingerprint="f" * 40,
                                  last_failed_at=failed)
    OutboxMessage.objects.create(task_id="o-1", task_name="proj.t", signature={})
    DueRetry.objects.create(task_id="d-1", task_name="proj.t", due_at=now, signature={})
    from recovery.store.parking import spool

    spool().put(record("spooled").to_dict())
    spool().quarantine(spool().put({"task_id": "refused"}), "DataError: value too long")

    # When Prometheus scrapes the Django view
    response = client.get("/metrics")

    # Then the backlogs are there, and every source was read
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.content.decode()
    assert 'recovery_dead_letters{status="parked"} 2.0' in text
    assert 'recovery_dead_letters{status="replaying"} 0.0' in text
    # Closed letters are history, not backlog: counting them would read the whole table at
    # every scrape (tests/security/test_metrics_endpoint.py).
    assert 'status="resolved"' not in text and 'status="discarded"' not in text
    assert "recovery_outbox_backlog 1.0" in text
    assert "recovery_due_retries_backlog 1.0" in text
    assert "recovery_spool_backlog 1.0" in text
    assert "recovery_spool_quarantined 1.0" in text
    assert 'recovery_collector_up{source="database"} 1.0' in text
    assert 'recovery_collector_up{source="spool"} 1.0' in text
    age = next(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("recovery_dead_letters_oldest_parked_age_seconds "))
    assert 3590 < age < 3700


def test_the_view_still_answers_when_the_database_cannot_be_read(client, monkeypatch):
    def down(*args, **kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr("recovery.observe.backlogs.pending_count", down)
    response = client.get("/metrics")
    assert response.status_code == 200
    text = response.content.decode()
    assert 'recovery_collector_up{source="database"} 0.0' in text
    assert "recovery_outbox_backlog" not in text


def test_an_invalid_metrics_port_fails_the_system_check(settings):
    from recovery.checks import check_recovery_settings

    settings.RECOVERY = {**settings.RECOVERY, "METRICS_PORT": "9808"}
    assert [e.id for e in check_recovery_settings()] == ["recovery.E014"]
    settings.RECOVERY = {**settings.RECOVERY, "METRICS_PORT": 9808}
    assert check_recovery_settings() == []


def test_a_worker_without_a_multiprocess_dir_gets_a_private_one_and_cleans_up(
        monkeypatch, tmp_path):
    import os
    import tempfile

    # Given no PROMETHEUS_MULTIPROC_DIR, and the directory of a worker that was SIGKILLed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "recovery-metrics-999999999-x"
    stale.mkdir()
    try:
        # When a worker starts
        path = metrics.ensure_multiprocess_dir()
        # Then it counts into a private directory its children inherit through the environment
        assert os.environ[metrics.MULTIPROC_ENV] == path
        assert path.startswith(str(tmp_path / f"recovery-metrics-{os.getpid()}-"))
        assert not stale.exists()
        metrics.retry_scheduled("metrics.private", "dependency")
        assert list(tmp_path.glob(f"recovery-metrics-{os.getpid()}-*/counter_{os.getpid()}.db"))
        assert sample("recovery_retries_total", task="metrics.private", kind="dependency") == 1
        # ... and removes it when it shuts down
        metrics.stop_worker_server()
        assert not os.path.exists(path)
    finally:
        # Not monkeypatch.delenv: its undo would put the variable back.
        os.environ.pop(metrics.MULTIPROC_ENV, None)
        metrics._reset()


def test_the_housekeeping_heartbeat_sets_the_workers_timestamp_gauge():
    from types import SimpleNamespace

    from recovery.delivery.worker import Housekeeping

    # Given a worker's consumer, named by its Celery hostname
    consumer = SimpleNamespace(hostname="w1@host-a")
    before = time.time()

    # When its housekeeping timer beats
    Housekeeping._heartbeat(consumer)

    # Then the gauge holds the time of the beat, labelled with the hostname
    beat = sample("recovery_worker_heartbeat_timestamp_seconds", worker="w1@host-a")
    assert before <= beat <= time.time()
    metrics.worker_heartbeat("w1@host-a")
    assert sample("recovery_worker_heartbeat_timestamp_seconds", worker="w1@host-a") >= beat


def test_a_dead_workers_last_heartbeat_stays_in_a_shared_directory(tmp_path):
    import os

    # Given a multiprocess directory shared with the Django view
    os.environ[metrics.MULTIPROC_ENV] = str(tmp_path)
    metrics._reset()
    try:
        metrics.worker_heartbeat("w2@host-b")
        beat = sample("recovery_worker_heartbeat_timestamp_seconds", worker="w2@host-b")
        assert beat > 0

        # When the worker's process is gone (marked dead, as a pool child is)
        metrics.mark_process_dead(os.getpid())

        # Then its last beat is still exposed, so its age grows until the alert fires
        assert sample("recovery_worker_heartbeat_timestamp_seconds", worker="w2@host-b") == beat
    finally:
        # Not monkeypatch.delenv: its undo would put the variable back.
        os.environ.pop(metrics.MULTIPROC_ENV, None)
        metrics._reset()


def test_a_broken_exporter_never_stops_a_heartbeat(monkeypatch):
    def explode(key):
        raise RuntimeError("exporter is broken")

    monkeypatch.setattr(metrics, "_metric", explode)
    assert metrics.worker_heartbeat("w3@host-c") is None
