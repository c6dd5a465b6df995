"""The single ``RECOVERY`` settings dict, read at call time so tests and
``override_settings`` take effect without restarting anything.

Every key and its default is documented in ``docs/settings.md``; keep the two
in step. Per-task options follow one precedence (applied in
``RecoveryTask.effective_policy``): per-call message header > task attribute >
``RECOVERY`` setting > library default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

__all__ = ["DEFAULTS", "get", "merged", "classifier_rules", "spool_dir"]

DEFAULTS: Mapping[str, Any] = {
    # RetryPolicy (as a dict or a RetryPolicy) used by tasks that declare none.
    "DEFAULT_POLICY": None,
    # Dotted paths of classifier rules asked before the built-in ones.
    "CLASSIFIER_RULES": (),
    # Deliveries of one task id (redeliveries after a lost worker included) before it is
    # parked as a poison pill instead of run again.
    "MAX_DELIVERIES": 5,
    # "auto": recovery.setup() completes the Celery configuration for the broker its URL
    # names (RabbitMQ: quorum queues with a delivery limit and a dead-letter exchange;
    # Redis: a visibility timeout). "off": broker settings are the project's alone.
    "BROKER_TOPOLOGY": "auto",
    # RabbitMQ's x-delivery-limit on the task queues: above MAX_DELIVERIES, so the broker
    # dead-letters a crash-looping message only when recovery's own cap could not act. A
    # queue argument: RabbitMQ refuses to redeclare a queue with another value.
    "BROKER_DELIVERY_LIMIT": 20,
    # Largest task message body (bytes) a worker runs; a larger one is parked as poison
    # before it runs. None: no limit.
    "MAX_MESSAGE_BYTES": 4 * 1024 * 1024,
    # Where dead letters are spooled, fsynced, while the database is unreachable.
    "SPOOL_DIR": None,
    # How often each worker tries to drain the spool into the database.
    "SPOOL_DRAIN_INTERVAL_SECONDS": 5.0,
    # Retries delayed longer than this wait in the database due-table instead of as broker
    # ETA messages held in worker memory.
    "BROKER_DELAY_MAX_SECONDS": 30.0,
    # How often each worker publishes due retries from the due-table.
    "DUE_POLL_INTERVAL_SECONDS": 1.0,
    # Redis visibility timeout recovery.setup() installs unless the project set
    # broker_transport_options["visibility_timeout"] itself; live workers keep extending
    # what they hold, so it bounds how long a dead worker's tasks stay stranded.
    "VISIBILITY_TIMEOUT_SECONDS": 60.0,
    # Store Celery's intermediate RETRY state in the result backend (one write per retry).
    # Off: the attempt history travels in the message and is kept on the dead letter.
    "STORE_RETRY_STATE": False,
    # Argument and header names whose values are masked wherever a person sees a letter;
    # the stored payload keeps the real values. Case-insensitive; keys of four characters
    # or fewer match whole words of a name (pin_code, cardNumber; not shipping, company),
    # longer ones anywhere in it. See recovery.core.redaction.
    "SECRET_KEYS": ("password", "passwd", "passphrase", "secret", "token", "authorization",
                    "auth", "api_key", "apikey", "access_key", "private_key", "credential",
                    "signature", "cookie", "session", "card", "cvv", "cvc", "pan", "iban",
                    "ssn", "pin", "otp"),
    # Most letters one admin request acts on (a bulk action or a failure group); more are
    # refused with the equivalent `manage.py dlq` command, which streams and is resumable.
    "ADMIN_BULK_MAX": 10000,
    # Days a closed letter (and the secrets in its payload) is kept after it was closed,
    # per status, before `manage.py dlq purge` deletes it with its audit trail; None keeps
    # it until a purge names an age. Parked letters are never purged unless asked.
    "RETENTION_DAYS": {"resolved": 30, "discarded": 30, "compensated": 90},
    # Delivery counts untouched this long belong to tasks long finished; purge forgets them.
    "DELIVERY_COUNT_RETENTION_DAYS": 7,
    # Proofs that a task's effect ran (self.effect) older than this are purged with the
    # letters, except those of tasks whose letter is still parked or replaying.
    "EFFECTS_RETENTION_DAYS": 90,
    # Failure rehearsals (manage.py rehearse): refused unless True. Turn on in staging and
    # other non-production environments only; a system check warns when DEBUG is off.
    "REHEARSALS_ENABLED": False,
    # How often each worker's outbox relay publishes committed intents the fast path missed.
    "OUTBOX_RELAY_INTERVAL_SECONDS": 1.0,
    # Longest wait between publish attempts of one outbox row while the broker is down.
    "OUTBOX_MAX_BACKOFF_SECONDS": 30.0,
    # Sent outbox rows are kept this long (for inspection), then the relay deletes them.
    "OUTBOX_KEEP_SENT_HOURS": 24.0,
    # How often each worker looks for saga steps parked while the database was down (their
    # run was not told) and records them (recovery.workflows.sagas.reconcile); steps dispatched more
    # than twice this long ago are looked at.
    "SAGA_RECONCILE_INTERVAL_SECONDS": 30.0,
    # Where circuit breakers and degraded-mode switches live, shared by every worker: a
    # redis:// URL, "database", or None for the broker's URL when it is Redis, else the
    # database.
    "SHARED_STATE_URL": None,
    # Circuit breakers by dependency name: CircuitPolicy fields (recovery.workflows.circuit), and
    # "default" for dependencies not listed.
    "CIRCUITS": {},
    # How long a task waits before trying again when it meets a degraded mode it defers on.
    "DEGRADED_DEFER_SECONDS": 30.0,
    # Port on which each worker serves its Prometheus metrics (/metrics; its pool children's
    # counts summed, see docs/metrics.md); None serves none. One port per worker on a host.
    "METRICS_PORT": None,
    # Address the worker's metrics endpoint listens on: this host only, unless a Prometheus
    # elsewhere must reach it (then e.g. "0.0.0.0", behind a firewall).
    "METRICS_ADDRESS": "127.0.0.1",
    # Who may scrape the Django view (recovery.observe.views.metrics): a request with
    # "Authorization: Bearer <METRICS_TOKEN>" (at least 32 characters; None: no token), or
    # one whose REMOTE_ADDR is in METRICS_ALLOWED_IPS (CIDRs); anyone else gets a 403.
    "METRICS_TOKEN": None,
    "METRICS_ALLOWED_IPS": ("127.0.0.1/32", "::1/128"),
    # Seconds a scrape's database and shared-state readings are reused by the next scrapes of
    # the process, so scrapes (several Prometheus replicas, a dashboard) cost one set of
    # queries per window; 0 reads them at every scrape.
    "METRICS_CACHE_SECONDS": 10.0,
    # Who counts recovery's events: "prometheus" (the recovery_* counters, docs/metrics.md)
    # and/or "cloudwatch-emf" (CloudWatch metrics, docs/cloudwatch.md). A backend left out
    # counts nothing; the Prometheus backlogs read at scrape time are served either way.
    "METRICS_BACKENDS": ("prometheus",),
    # The CloudWatch backend (recovery.observe.cloudwatch). Keys left out keep these defaults.
    "CLOUDWATCH": {
        # The CloudWatch namespace of every metric (not under "AWS/").
        "NAMESPACE": "CeleryRecovery",
        # The logger the EMF lines are written to. Unless the project gives it handlers
        # (LOGGING), each line goes bare to the process's standard output, where the
        # CloudWatch agent, Lambda or the awslogs log driver pick it up.
        "LOGGER": "recovery.emf",
        # Each process sums its counts for this long, then writes them (one line per task,
        # kind and queue, however many events). 0: one line per event, written at once.
        "FLUSH_INTERVAL_SECONDS": 10.0,
        # Distinct series a process holds before it flushes early.
        "MAX_BUFFERED_SERIES": 1000,
        # Send the counts with the PutMetricData API (boto3) instead of writing EMF lines,
        # for hosts without a log agent. Credentials: boto3's usual chain.
        "PUT_METRIC_DATA": False,
        # PutMetricData's region (None: boto3's, e.g. AWS_REGION) and endpoint (None: AWS's;
        # e.g. a VPC endpoint).
        "REGION": None,
        "ENDPOINT_URL": None,
        # Connect and read timeout of each PutMetricData call (the flush thread waits, never
        # a task).
        "TIMEOUT_SECONDS": 5.0,
    },
    # How often each worker's main process sets recovery_worker_heartbeat_timestamp_seconds;
    # the shipped alert (deploy/prometheus/alerts.yml) fires after several missed beats.
    "HEARTBEAT_INTERVAL_SECONDS": 15.0,
    # When a human must be told, and how (recovery.observe.escalation; docs/escalation.md). Keys
    # left out keep these defaults.
    "ESCALATION": {
        # Tasks whose first permanent failure opens an incident (also: a RecoveryTask
        # subclass with critical = True).
        "CRITICAL_TASKS": (),
        # A failure fingerprint with this many dead letters parked within THRESHOLD_MINUTES
        # opens an incident; None turns the rule off.
        "THRESHOLD_LETTERS": 10,
        "THRESHOLD_MINUTES": 15,
        # A compensation that fails for good (a saga's, or one started from a letter).
        "ON_COMPENSATION_FAILURE": True,
        # Where operators reach the admin, e.g. "https://ops.example.com": links in
        # escalations are absolute only when this is set.
        "ADMIN_BASE_URL": "",
        # Report each parked letter (and each incident) to sentry-sdk's client, when the
        # project has initialised one; one Sentry issue per failure fingerprint.
        "SENTRY": True,
        # A JSON POST per incident opened or resolved, signed with HMAC-SHA256 of
        # WEBHOOK_SECRET; None sends none.
        "WEBHOOK_URL": None,
        "WEBHOOK_SECRET": None,
        "WEBHOOK_TIMEOUT_SECONDS": 5.0,
        # Mail settings.ADMINS (through Django's mail) when an incident opens.
        "EMAIL": True,
        # Deliveries of one notification are retried with backoff up to MAX_ATTEMPTS,
        # waiting at most MAX_BACKOFF_SECONDS between two.
        "MAX_ATTEMPTS": 12,
        "MAX_BACKOFF_SECONDS": 600.0,
        # How often each worker delivers pending notifications.
        "DELIVERY_INTERVAL_SECONDS": 2.0,
    },
    # The watchdog (recovery.observe.watchdog), a periodic task that finds work that is stuck
    # rather than failed. Keys left out keep these defaults; a limit of None turns that
    # check off.
    "WATCHDOG": {
        # How often Celery beat runs it (recovery.setup adds the schedule entry).
        "INTERVAL_SECONDS": 60.0,
        # A task started longer ago than this is stuck, unless the task sets
        # deadline_seconds (RecoveryTask) or a time limit of its own.
        "TASK_DEADLINE_SECONDS": 3600.0,
        # A saga step running longer than this (Step(timeout_seconds=) overrides it) is
        # dispatched again under its own task id, at most SAGA_STEP_MAX_REDISPATCHES times;
        # then it is escalated.
        "SAGA_STEP_TIMEOUT_SECONDS": 900.0,
        "SAGA_STEP_MAX_REDISPATCHES": 3,
        # A letter still replaying this long after its replay was published never reported
        # back: it goes back to parked, and is escalated.
        "REPLAYING_AFTER_SECONDS": 900.0,
        # An outbox message unsent this long after it was committed is escalated.
        "OUTBOX_AFTER_SECONDS": 300.0,
        # How long a sweep waits for each worker's answer to what it holds (running,
        # prefetched, waiting for a countdown/ETA). When a worker seen alive recently does
        # not answer in time, the sweep takes nothing for lost.
        "INSPECT_TIMEOUT_SECONDS": 1.0,
    },
    # Bounds on how long recovery's own database work in a worker's main process waits on
    # a database that hangs (recovery.store.db_timeouts): libpq options added to the connections
    # of the consumer and housekeeping threads where DATABASES sets none. None: no bound.
    # Seconds to establish a connection (libpq connect_timeout).
    "DB_CONNECT_TIMEOUT_SECONDS": 5.0,
    # Seconds before an established connection whose peer stopped answering is dropped
    # (TCP keepalives and tcp_user_timeout).
    "DB_NETWORK_TIMEOUT_SECONDS": 15.0,
    # Longest statement of the housekeeping thread (server-side statement_timeout).
    "DB_STATEMENT_TIMEOUT_SECONDS": 30.0,
    # Bounds on what is stored per letter.
    "MESSAGE_MAX_CHARS": 2000,
    "TRACEBACK_MAX_CHARS": 20000,
}


def get(name: str) -> Any:
    """One ``RECOVERY`` value, or its default."""
    user = getattr(settings, "RECOVERY", None) or {}
    if name in user:
        return user[name]
    return DEFAULTS[name]


def merged(name: str, value: Any) -> dict[str, Any]:
    """A dict setting of ``RECOVERY`` (``ESCALATION``, ``WATCHDOG``, ``CLOUDWATCH``) over its
    defaults, so keys left out keep them.

    Raises ValueError naming the setting when ``value`` is not a dict, or names a key the
    defaults do not (a typo would otherwise be ignored without a word).
    """
    defaults = DEFAULTS[name]
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"RECOVERY[{name!r}] must be a dict, not {type(value).__name__}")
    result = {**defaults, **dict(value or {})}
    unknown = set(result) - set(defaults)
    if unknown:
        raise ValueError(f"unknown RECOVERY[{name!r}] keys: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(defaults))}")
    return result


def classifier_rules() -> tuple:
    return _import_rules(tuple(get("CLASSIFIER_RULES") or ()))


@lru_cache(maxsize=16)
def _import_rules(paths: tuple) -> tuple:
    return tuple(import_string(p) if isinstance(p, str) else p for p in paths)


def spool_dir() -> Path:
    configured = get("SPOOL_DIR")
    if configured:
        return Path(configured)
    base = getattr(settings, "BASE_DIR", None) or os.getcwd()
    return Path(base) / "var" / "recovery-spool"
