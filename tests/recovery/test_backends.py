"""recovery.observe.backends: RECOVERY["METRICS_BACKENDS"] decides, at call time, which
exporters' receivers count an event."""

from __future__ import annotations

import pytest

from recovery import conf, subscriptions
from recovery.observe import backends, metrics
from recovery.observe.cloudwatch import receivers as cloudwatch


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)


def retries(task: str) -> float:
    return metrics.registry().get_sample_value(
        "recovery_retries_total", {"task": task, "kind": "dependency"}) or 0.0


@pytest.mark.parametrize("listed, prometheus, cloudwatch_on", [
    (("prometheus",), True, False),
    (["prometheus", "cloudwatch-emf"], True, True),
    (["cloudwatch-emf"], False, True),
    ([], False, False),
    ("cloudwatch-emf", False, True),  # a bare string (recovery.E040) is read as one name
    (None, False, False),
])
def test_a_backend_counts_only_while_it_is_listed(settings, listed, prometheus, cloudwatch_on):
    settings.RECOVERY = {**settings.RECOVERY, "METRICS_BACKENDS": listed}

    assert backends.enabled(backends.PROMETHEUS) is prometheus
    assert backends.enabled(backends.CLOUDWATCH_EMF) is cloudwatch_on


def test_the_prometheus_receivers_honour_the_setting(settings):
    before = retries("backends.charge")

    settings.RECOVERY = {**settings.RECOVERY, "METRICS_BACKENDS": ["cloudwatch-emf"]}
    metrics.count_retry_scheduled(task_name="backends.charge", kind="dependency", queue="")
    assert retries("backends.charge") == before

    settings.RECOVERY = {**settings.RECOVERY, "METRICS_BACKENDS": ["prometheus"]}
    metrics.count_retry_scheduled(task_name="backends.charge", kind="dependency", queue="")
    assert retries("backends.charge") == before + 1


def test_the_default_is_prometheus_alone():
    assert tuple(conf.DEFAULTS["METRICS_BACKENDS"]) == (backends.PROMETHEUS,)


def test_every_counting_receiver_of_an_exporter_is_gated_by_its_backend():
    for event, receivers in subscriptions.RECEIVERS:
        for receiver in receivers:
            if receiver.__module__ in (metrics.__name__, cloudwatch.__name__) and \
                    receiver.__name__.startswith(("count_", "record_")):
                assert hasattr(receiver, "__wrapped__"), (
                    f"{receiver.__module__}.{receiver.__name__} ({event.name}) is not "
                    f"wrapped in backends.counted_by")
