"""recovery.checks: a bad RECOVERY or Celery configuration is reported at start-up."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from django.core.checks import Error, Warning, run_checks

from recovery import checks
from recovery.checks import (check_celery_serialization, check_private_internals,
                             check_recovery_settings)


def ids(messages):
    return sorted(message.id for message in messages)


def recovery_messages():
    """What ``manage.py check`` reports for this app, through Django's registry."""
    return [m for m in run_checks() if (m.id or "").startswith("recovery.")]


@pytest.fixture
def recovery(settings):
    """Set RECOVERY keys on top of the test settings (the spool dir included)."""

    def apply(**values):
        settings.RECOVERY = {**settings.RECOVERY, **values}

    return apply


# -- valid configuration --------------------------------------------------------------------------


def test_the_test_settings_pass_every_check():
    assert check_recovery_settings() == []
    assert check_celery_serialization() == []
    assert recovery_messages() == []


def test_a_full_valid_configuration_passes(recovery, settings):
    recovery(
        DEFAULT_POLICY={"max_attempts": 4, "jitter": "decorrelated",
                        "non_retryable": ["recovery.core.errors.PermanentError"],
                        "per_kind": {"resource_exhausted": {"max_delay_seconds": 3600}}},
        CLASSIFIER_RULES=["recovery.core.classification.stdlib_rule"],
        MAX_DELIVERIES=3,
        MESSAGE_MAX_CHARS=500,
    )
    settings.CELERY_ACCEPT_CONTENT = ["json"]
    assert check_recovery_settings() == []
    assert check_celery_serialization() == []
    assert recovery_messages() == []


def test_a_policy_object_is_a_valid_default_policy(recovery):
    from recovery.core.policy import RetryPolicy

    recovery(DEFAULT_POLICY=RetryPolicy(max_attempts=2))
    assert check_recovery_settings() == []


def test_no_recovery_setting_at_all_is_valid(settings):
    del settings.RECOVERY
    assert check_recovery_settings() == []


# -- RECOVERY -------------------------------------------------------------------------------------


def test_recovery_must_be_a_dict(settings):
    settings.RECOVERY = [("MAX_DELIVERIES", 3)]
    assert ids(check_recovery_settings()) == ["recovery.E001"]


def test_an_unknown_recovery_key_is_an_error_naming_it(recovery):
    recovery(MAX_DELIVERY=3, SPOOL_DIRECTORY="/tmp/x")
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.E002"]
    (problem,) = problems
    assert isinstance(problem, Error)
    assert "MAX_DELIVERY" in problem.msg and "SPOOL_DIRECTORY" in problem.msg
    assert "MAX_DELIVERIES" in problem.hint  # the hint lists the keys that do exist
    assert "recovery.E002" in ids(recovery_messages())


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"jitter": "gaussian"}, "jitter must be one of"),
        ({"max_retries": 3}, "unknown RetryPolicy fields ['max_retries']"),
        ({"non_retryable": ["myapp.errors.Nope"]}, "cannot be imported"),
        ({"per_kind": {"network": {}}}, "is not a failure kind"),
        ({"initial_delay_seconds": 10, "max_delay_seconds": 1}, "is below initial_delay_seconds"),
        ("full jitter please", "unknown RetryPolicy fields"),
        (5, ""),
    ],
)
def test_an_invalid_default_policy_is_an_error_that_explains_it(recovery, policy, fragment):
    recovery(DEFAULT_POLICY=policy)
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.E003"]
    assert fragment in problems[0].msg
    assert "recovery.E003" in ids(recovery_messages())


@pytest.mark.parametrize(
    "rules",
    [["myapp.rules.nope"], ["recovery.core.classification.no_such_rule"], ["norules"]],
)
def test_unimportable_classifier_rules_are_an_error(recovery, rules):
    recovery(CLASSIFIER_RULES=rules)
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.E004"]
    assert "cannot be imported" in problems[0].msg
    assert "recovery.E004" in ids(recovery_messages())


@pytest.mark.parametrize("value", [0, -1, 2.5, "3"])
def test_max_deliveries_must_be_a_positive_integer(recovery, value):
    recovery(MAX_DELIVERIES=value)
    assert ids(check_recovery_settings()) == ["recovery.E005"]


@pytest.mark.parametrize(
    "key",
    ["SPOOL_DRAIN_INTERVAL_SECONDS", "BROKER_DELAY_MAX_SECONDS", "DUE_POLL_INTERVAL_SECONDS",
     "VISIBILITY_TIMEOUT_SECONDS"],
)
@pytest.mark.parametrize("value", [0, -5, "soon", [1]])
def test_intervals_must_be_positive_numbers(recovery, key, value):
    recovery(**{key: value})
    problems = check_recovery_settings()
    assert "recovery.E006" in ids(problems)
    assert any(key in p.msg for p in problems if p.id == "recovery.E006")


def test_a_broker_delay_at_or_above_the_visibility_timeout_is_a_warning(recovery):
    recovery(VISIBILITY_TIMEOUT_SECONDS=30, BROKER_DELAY_MAX_SECONDS=30)
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.W001"]
    assert isinstance(problems[0], Warning)


def test_a_broker_delay_below_the_visibility_timeout_is_fine(recovery):
    recovery(VISIBILITY_TIMEOUT_SECONDS=30, BROKER_DELAY_MAX_SECONDS=29.5)
    assert check_recovery_settings() == []


def test_several_mistakes_are_all_reported(recovery):
    recovery(BOGUS=1, DEFAULT_POLICY={"max_attempts": 0}, CLASSIFIER_RULES=["nope.nope"],
             MAX_DELIVERIES=0)
    assert ids(check_recovery_settings()) == [
        "recovery.E002", "recovery.E003", "recovery.E004", "recovery.E005",
    ]


# -- Celery serialization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accept",
    [
        ["pickle"],
        ["json", "pickle"],
        ("json", "pickle"),
        ["application/x-python-serialize"],  # pickle's content type, as kombu also accepts it
    ],
)
def test_accepting_pickle_is_an_error(settings, accept):
    settings.CELERY_ACCEPT_CONTENT = accept
    problems = check_celery_serialization()
    assert ids(problems) == ["recovery.E010"]
    assert "CELERY_ACCEPT_CONTENT = ['json']" in problems[0].hint
    assert "recovery.E010" in ids(recovery_messages())


@pytest.mark.parametrize("accept", [["json"], ["application/json"], ["json", "msgpack"], []])
def test_accepting_only_safe_serializers_is_fine(settings, accept):
    settings.CELERY_ACCEPT_CONTENT = accept
    assert check_celery_serialization() == []


@pytest.mark.parametrize("name", ["CELERY_TASK_SERIALIZER", "CELERY_RESULT_SERIALIZER",
                                  "CELERY_EVENT_SERIALIZER"])
@pytest.mark.parametrize("value", ["pickle", "application/x-python-serialize"])
def test_serializing_with_pickle_is_an_error(settings, name, value):
    # A worker that accepts only JSON still writes pickle there: results and events a
    # reader then unpickles, and dead letters no one can inspect.
    setattr(settings, name, value)
    problems = check_celery_serialization()
    assert ids(problems) == ["recovery.E010"]
    assert name in problems[0].msg
    assert f"{name} = 'json'" in problems[0].hint


@pytest.mark.parametrize("accept", [["pickle"], ["json", "application/x-python-serialize"]])
def test_accepting_pickle_results_is_an_error(settings, accept):
    # Reading a result unpickles whatever the result store holds: code execution for anyone
    # who can write a row there.
    settings.CELERY_RESULT_ACCEPT_CONTENT = accept
    problems = check_celery_serialization()
    assert ids(problems) == ["recovery.E010"]
    assert "CELERY_RESULT_ACCEPT_CONTENT" in problems[0].msg


def test_each_setting_that_uses_pickle_is_named(settings):
    settings.CELERY_ACCEPT_CONTENT = ["pickle"]
    settings.CELERY_TASK_SERIALIZER = "pickle"
    settings.CELERY_EVENT_SERIALIZER = "pickle"
    problems = check_celery_serialization()
    assert ids(problems) == ["recovery.E010"] * 3


def test_json_serializers_everywhere_are_fine(settings):
    for name in ("CELERY_TASK_SERIALIZER", "CELERY_RESULT_SERIALIZER", "CELERY_EVENT_SERIALIZER"):
        setattr(settings, name, "json")
    settings.CELERY_RESULT_ACCEPT_CONTENT = ["json"]
    assert check_celery_serialization() == []


def test_no_accept_content_setting_is_fine(settings):
    if hasattr(settings, "CELERY_ACCEPT_CONTENT"):
        del settings.CELERY_ACCEPT_CONTENT
    assert check_celery_serialization() == []


@pytest.mark.parametrize("retention", [
    {"parked": 30},                    # parked letters have no retention
    {"resolvd": 30},                   # a misspelt status would silently never be purged
    {"resolved": 0},
    {"resolved": "30"},
    [("resolved", 30)],
])
def test_a_bad_retention_is_reported(recovery, retention):
    recovery(RETENTION_DAYS=retention)
    assert "recovery.E011" in ids(check_recovery_settings())


def test_a_partial_retention_is_valid_and_keeps_the_other_defaults(recovery):
    from recovery.store.retention import retention_days

    recovery(RETENTION_DAYS={"resolved": 7, "compensated": None})
    assert check_recovery_settings() == []
    assert retention_days() == {"resolved": 7, "discarded": 30, "compensated": None}


@pytest.mark.parametrize("key", ["ADMIN_BULK_MAX", "DELIVERY_COUNT_RETENTION_DAYS"])
def test_operator_limits_must_be_positive(recovery, key):
    recovery(**{key: 0})
    assert "recovery.E005" in ids(check_recovery_settings())


@pytest.mark.parametrize("key", ["OUTBOX_RELAY_INTERVAL_SECONDS", "OUTBOX_MAX_BACKOFF_SECONDS",
                                 "OUTBOX_KEEP_SENT_HOURS"])
def test_outbox_timings_must_be_positive(recovery, key):
    recovery(**{key: -1})
    assert "recovery.E006" in ids(check_recovery_settings())


# -- circuits and shared state --------------------------------------------------------------------


def test_valid_circuits_and_shared_state_pass(recovery):
    from recovery.workflows.circuit import CircuitPolicy

    recovery(CIRCUITS={"payments-api": {"minimum_calls": 10, "open_seconds": 30},
                       "maps": CircuitPolicy(), "default": {}},
             SHARED_STATE_URL="redis://127.0.0.1:6379/3", DEGRADED_DEFER_SECONDS=10)
    assert check_recovery_settings() == []
    recovery(SHARED_STATE_URL="database")
    assert check_recovery_settings() == []


@pytest.mark.parametrize(("circuits", "fragment"), [
    ({"payments-api": {"open_secs": 30}}, "unknown circuit policy fields ['open_secs']"),
    ({"payments-api": {"failure_rate_threshold": 50}}, "failure_rate_threshold must be in (0, 1]"),
    ({"payments-api": {"minimum_calls": 0}}, "at least 1"),
    ({"payments-api": 30}, "expected a dict of CircuitPolicy fields, not int"),
    ([("payments-api", {})], "must be a dict of dependency name to circuit policy"),
])
def test_a_circuit_that_cannot_build_a_policy_is_an_error(recovery, circuits, fragment):
    recovery(CIRCUITS=circuits)
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.E012"]
    assert fragment in problems[0].msg
    assert "recovery.E012" in ids(recovery_messages())


@pytest.mark.parametrize("url", ["db", "postgres://x/y", 6379])
def test_a_shared_state_url_that_is_neither_redis_nor_database_is_an_error(recovery, url):
    recovery(SHARED_STATE_URL=url)
    assert ids(check_recovery_settings()) == ["recovery.E013"]


@pytest.mark.parametrize("value", [0, -1, "30"])
def test_degraded_defer_seconds_must_be_positive(recovery, value):
    recovery(DEGRADED_DEFER_SECONDS=value)
    assert ids(check_recovery_settings()) == ["recovery.E006"]


@pytest.mark.parametrize("escalation, fragment", [
    ({"THRESHOLD_LETTERS": 0}, "THRESHOLD_LETTERS must be a positive integer or None"),
    ({"WEBHOOK_URL": "https://tickets.example.com/hook"}, "WEBHOOK_URL needs WEBHOOK_SECRET"),
    ({"WEBHOK_URL": "https://x"}, "unknown RECOVERY['ESCALATION'] keys: WEBHOK_URL"),
])
def test_bad_escalation_rules_are_an_error_that_says_what_to_fix(recovery, escalation, fragment):
    recovery(ESCALATION=escalation)
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.E015"]
    assert fragment in problems[0].msg


def test_valid_escalation_rules_pass(recovery):
    recovery(ESCALATION={"THRESHOLD_LETTERS": 5, "THRESHOLD_MINUTES": 2,
                         "WEBHOOK_URL": "https://tickets.example.com/hook",
                         "WEBHOOK_SECRET": "s" * 32})  # shorter fails recovery.E026
    assert check_recovery_settings() == []


@pytest.mark.parametrize("value", [0, -15, "15"])
def test_the_heartbeat_interval_must_be_a_positive_number(recovery, value):
    recovery(HEARTBEAT_INTERVAL_SECONDS=value)
    problems = check_recovery_settings()
    assert ids(problems) == ["recovery.E006"]
    assert "HEARTBEAT_INTERVAL_SECONDS" in problems[0].msg
    recovery(HEARTBEAT_INTERVAL_SECONDS=5)
    assert check_recovery_settings() == []


# -- private internals of kombu and django-celery-results --------------------------------------


def test_the_installed_kombu_and_django_celery_results_have_the_internals_recovery_uses():
    assert check_private_internals() == []


def test_a_kombu_without_the_redis_internals_is_an_error_naming_its_version(monkeypatch):
    from kombu.transport import redis as kombu_redis

    monkeypatch.delattr(kombu_redis.Channel, "unacked_index_key")
    problems = check_private_internals()
    assert [p.id for p in problems] == ["recovery.E017"]
    assert f"kombu {version('kombu')} has no Channel.unacked_index_key" in problems[0].msg
    assert "run twice" in problems[0].msg


def test_a_kombu_qos_without_its_delivered_map_is_an_error(monkeypatch):
    from kombu.transport.virtual.base import QoS

    monkeypatch.delattr(QoS, "_delivered")
    problems = check_private_internals()
    assert [p.id for p in problems] == ["recovery.E017"]
    assert "QoS._delivered" in problems[0].msg


def test_a_django_celery_results_without_its_internals_is_an_error_naming_its_version(
        monkeypatch):
    from django_celery_results.backends.database import DatabaseBackend

    monkeypatch.delattr(DatabaseBackend, "_get_meta_from_request")
    problems = check_private_internals()
    assert [p.id for p in problems] == ["recovery.E018"]
    assert (f"django-celery-results {version('django-celery-results')} has no "
            f"DatabaseBackend._get_meta_from_request") in problems[0].msg


@pytest.mark.parametrize("key", ["DB_CONNECT_TIMEOUT_SECONDS", "DB_NETWORK_TIMEOUT_SECONDS",
                                 "DB_STATEMENT_TIMEOUT_SECONDS"])
@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_database_timeouts_must_be_positive_seconds(recovery, key, value):
    recovery(**{key: value})
    assert "recovery.E006" in [p.id for p in check_recovery_settings()]


@pytest.mark.parametrize("key", ["DB_CONNECT_TIMEOUT_SECONDS", "DB_NETWORK_TIMEOUT_SECONDS",
                                 "DB_STATEMENT_TIMEOUT_SECONDS"])
def test_a_database_timeout_of_none_is_valid(recovery, key):
    recovery(**{key: None})
    assert check_recovery_settings() == []


# -- metrics backends and CloudWatch --------------------------------------------------------------


def test_cloudwatch_with_prometheus_and_put_metric_data_passes(recovery):
    recovery(METRICS_BACKENDS=["prometheus", "cloudwatch-emf"],
             CLOUDWATCH={"NAMESPACE": "Shop/Recovery", "PUT_METRIC_DATA": True,
                         "REGION": "eu-west-1"})

    assert check_recovery_settings() == []


@pytest.mark.parametrize("backends", [["prometheus", "statsd"], "prometheus", None, {"prometheus"}])
def test_an_unknown_or_malformed_metrics_backend_fails_e040(recovery, backends):
    recovery(METRICS_BACKENDS=backends)

    problems = check_recovery_settings()

    assert ids(problems) == ["recovery.E040"]
    assert "cloudwatch-emf" in problems[0].msg


def test_an_invalid_cloudwatch_setting_fails_e041_naming_the_key(recovery):
    recovery(METRICS_BACKENDS=["cloudwatch-emf"], CLOUDWATCH={"NAMESPACE": "AWS/Mine"})

    problems = check_recovery_settings()

    assert ids(problems) == ["recovery.E041"]
    assert "NAMESPACE" in problems[0].msg


def test_put_metric_data_without_boto3_fails_e042(recovery, monkeypatch):
    real = checks.find_spec
    monkeypatch.setattr(checks, "find_spec", lambda name: None if name == "boto3" else real(name))
    recovery(METRICS_BACKENDS=["cloudwatch-emf"], CLOUDWATCH={"PUT_METRIC_DATA": True})

    assert ids(check_recovery_settings()) == ["recovery.E042"]


def test_cloudwatch_settings_without_the_backend_warn_w040(recovery):
    recovery(CLOUDWATCH={"NAMESPACE": "Shop/Recovery"})

    problems = check_recovery_settings()

    assert ids(problems) == ["recovery.W040"]
    assert isinstance(problems[0], Warning)
