"""Test settings: real PostgreSQL, Redis and (for the broker matrix) RabbitMQ or moto's
SQS server on localhost, found through TEST_DATABASE_URL, TEST_BROKER_URL and TEST_STORE_URL (defaults
below).

TEST_BROKER_URL is the broker the workers use; TEST_STORE_URL is the Redis where test
tasks record their runs and the workers share circuit state. With a Redis broker both
are the same database, as in most deployments; with RabbitMQ or SQS the store stays on
Redis. TEST_BROKER_URL=sqs://moto starts moto's SQS server for the session
(tests/brokers.py).
"""

import json
import os

import dj_database_url

os.environ.setdefault("CELERY_BROKER_URL", os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/11"))
if os.environ["CELERY_BROKER_URL"] == "sqs://moto":
    # moto's SQS server on a free port, started by the session (tests/conftest.py); the
    # worker subprocesses inherit the concrete URL.
    import socket

    _probe = socket.socket()
    _probe.bind(("127.0.0.1", 0))
    os.environ["CELERY_BROKER_URL"] = os.environ["TEST_MOTO_URL"] = (
        f"sqs://testing:testing@127.0.0.1:{_probe.getsockname()[1]}")
    _probe.close()
# DEBUG is off, as in production; the suite (and its workers, which inherit this) needs a key.
os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-key-" + "x" * 50)

from config.settings import *  # noqa: E402,F401,F403

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/celery_recovery"
)
TEST_BROKER_URL = os.environ["CELERY_BROKER_URL"]
TEST_STORE_URL = os.environ.get("TEST_STORE_URL") or (
    TEST_BROKER_URL if TEST_BROKER_URL.startswith("redis") else "redis://127.0.0.1:6379/11")

DATABASES = {"default": dj_database_url.parse(TEST_DATABASE_URL, conn_max_age=600)}
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = 3

CELERY_BROKER_URL = TEST_BROKER_URL
# A worker of its own queue (tests/integration/test_rabbitmq.py: a queue declared with a
# delivery limit of its own, which RabbitMQ fixes when the queue is first declared).
if os.environ.get("TEST_TASK_QUEUE"):
    CELERY_TASK_DEFAULT_QUEUE = os.environ["TEST_TASK_QUEUE"]

# The test client, the live server of the browser tests and the workers speak plain HTTP.
SECURE_SSL_REDIRECT = SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = False
SECURE_HSTS_SECONDS = 0
CELERY_BROKER_TRANSPORT_OPTIONS = {}

RECOVERY = {
    "SPOOL_DIR": os.environ.get("RECOVERY_SPOOL_DIR", str(VAR_DIR / "test-spool")),  # noqa: F405
    "VISIBILITY_TIMEOUT_SECONDS": float(os.environ.get("RECOVERY_VISIBILITY_TIMEOUT_SECONDS", 12)),
    "BROKER_DELAY_MAX_SECONDS": float(os.environ.get("RECOVERY_BROKER_DELAY_MAX_SECONDS", 5)),
    "MAX_DELIVERIES": int(os.environ.get("RECOVERY_MAX_DELIVERIES", 3)),
    "BROKER_DELIVERY_LIMIT": int(os.environ.get("RECOVERY_BROKER_DELIVERY_LIMIT", 20)),
    "MAX_MESSAGE_BYTES": int(os.environ.get("RECOVERY_MAX_MESSAGE_BYTES", 4 * 1024 * 1024)),
    "SPOOL_DRAIN_INTERVAL_SECONDS": 1.0,
    "DUE_POLL_INTERVAL_SECONDS": 0.5,
    # Small numbers so the circuit-breaker tests run in seconds
    # (tests/integration/test_circuit_and_fallback.py).
    "CIRCUITS": {
        "partner-api": {"failure_rate_threshold": 0.5, "minimum_calls": 4, "window_seconds": 30,
                        "open_seconds": 3, "half_open_max_calls": 1},
    },
    "DEGRADED_DEFER_SECONDS": 1.0,
    # A worker whose circuit state store is down (test_worker_failures.py).
    "SHARED_STATE_URL": os.environ.get("RECOVERY_SHARED_STATE_URL") or (
        None if TEST_BROKER_URL.startswith("redis") else TEST_STORE_URL),
    # Workers of tests/integration/test_metrics.py serve their metrics here.
    "METRICS_PORT": int(os.environ["RECOVERY_METRICS_PORT"])
    if os.environ.get("RECOVERY_METRICS_PORT") else None,
    "METRICS_ADDRESS": "127.0.0.1",
    # Each test reads the backlogs it just wrote (tests/security/test_metrics_endpoint.py
    # turns the cache on).
    "METRICS_CACHE_SECONDS": 0,
    # Who counts events, and how CloudWatch metrics are sent, for the worker processes of
    # tests/integration/test_cloudwatch.py, as JSON.
    "METRICS_BACKENDS": json.loads(os.environ.get("RECOVERY_TEST_METRICS_BACKENDS")
                                   or '["prometheus"]'),
    "CLOUDWATCH": json.loads(os.environ.get("RECOVERY_TEST_CLOUDWATCH") or "{}"),
    # Escalation rules and channels of the worker processes of the escalation tests
    # (tests/integration/test_escalation.py), as JSON.
    "ESCALATION": json.loads(os.environ.get("RECOVERY_TEST_ESCALATION") or "{}"),
    # The watchdog of the worker and beat processes of tests/integration/test_watchdog.py
    # (short intervals and limits), as JSON.
    "WATCHDOG": json.loads(os.environ.get("RECOVERY_TEST_WATCHDOG") or "{}"),
    # The worker processes of tests/integration/test_rehearsals.py take rehearsals.
    "REHEARSALS_ENABLED": os.environ.get("RECOVERY_TEST_REHEARSALS") == "1",
}

# Incident e-mail goes to a real SMTP server started by the escalation tests.
if os.environ.get("RECOVERY_TEST_SMTP_PORT"):
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = "127.0.0.1"
    EMAIL_PORT = int(os.environ["RECOVERY_TEST_SMTP_PORT"])
    ADMINS = [("On-call", "oncall@example.com")]

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Workers of tests/integration/test_sentry.py report to a local Sentry stand-in, with
# sentry-sdk's Celery integration on, as a project would configure it. Without sentry-sdk's
# DedupeIntegration, which would hide the Celery integration's second report of a parked
# task in the simplest case: recovery's own filter must drop it.
if os.environ.get("RECOVERY_TEST_SENTRY_DSN"):
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.dedupe import DedupeIntegration

    sentry_sdk.init(
        dsn=os.environ["RECOVERY_TEST_SENTRY_DSN"],
        integrations=[CeleryIntegration()],
        disabled_integrations=[DedupeIntegration()],
        _experiments={"transport_compression_level": 0},
    )
