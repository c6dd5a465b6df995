"""Django system checks: bad recovery configuration fails at start-up, saying how to fix it."""

from __future__ import annotations

import ipaddress
from importlib.util import find_spec

from celery import current_app as current_celery_app
from django.apps import apps
from django.conf import settings
from django.core.checks import Error, Warning, register
from kombu.transport import redis as kombu_redis

from . import conf
from .core.policy import default_policy
from .delivery import topology, visibility
from .observe import backends, webhook_signing
from .observe.cloudwatch.options import CloudWatchOptions
from .store import pg_fastpath
from .observe.escalation import EscalationRules
from .observe.watchdog import WatchdogPolicy
from .workflows.circuit import CircuitPolicy


@register()
def check_recovery_settings(app_configs=None, **kwargs):
    problems = []
    user = getattr(settings, "RECOVERY", None)
    if user is None:
        return problems
    if not isinstance(user, dict):
        return [Error("RECOVERY must be a dict.", hint="See docs/settings.md.", id="recovery.E001")]
    unknown = sorted(set(user) - set(conf.DEFAULTS))
    if unknown:
        problems.append(Error(
            f"RECOVERY has unknown keys: {', '.join(unknown)}.",
            hint=f"Known keys: {', '.join(sorted(conf.DEFAULTS))} (docs/settings.md).",
            id="recovery.E002",
        ))
    try:
        default_policy()
    except (TypeError, ValueError) as exc:
        problems.append(Error(
            f"RECOVERY['DEFAULT_POLICY'] is invalid: {exc}",
            hint="Write it as RetryPolicy fields, e.g. {'max_attempts': 5, 'jitter': 'full'}.",
            id="recovery.E003",
        ))
    try:
        conf.classifier_rules()
    except ImportError as exc:
        problems.append(Error(
            f"RECOVERY['CLASSIFIER_RULES'] cannot be imported: {exc}",
            hint="Each entry is a dotted path to a callable exception -> Failure | None.",
            id="recovery.E004",
        ))
    for key in ("MAX_DELIVERIES", "MAX_MESSAGE_BYTES"):
        value = user.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(Error(f"RECOVERY['{key}'] must be an integer >= 1.", id="recovery.E005"))
    for key in ("SPOOL_DRAIN_INTERVAL_SECONDS", "BROKER_DELAY_MAX_SECONDS",
                "DUE_POLL_INTERVAL_SECONDS", "VISIBILITY_TIMEOUT_SECONDS",
                "OUTBOX_RELAY_INTERVAL_SECONDS", "OUTBOX_MAX_BACKOFF_SECONDS",
                "OUTBOX_KEEP_SENT_HOURS", "DEGRADED_DEFER_SECONDS",
                "SAGA_RECONCILE_INTERVAL_SECONDS", "HEARTBEAT_INTERVAL_SECONDS"):
        value = user.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            problems.append(Error(f"RECOVERY['{key}'] must be a positive number.",
                                  id="recovery.E006"))
    for key in ("DB_CONNECT_TIMEOUT_SECONDS", "DB_NETWORK_TIMEOUT_SECONDS",
                "DB_STATEMENT_TIMEOUT_SECONDS"):
        value = user.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0):
            problems.append(Error(f"RECOVERY['{key}'] must be a positive number of seconds, "
                                  f"or None for no bound.", id="recovery.E006"))
    for key in ("ADMIN_BULK_MAX", "DELIVERY_COUNT_RETENTION_DAYS", "EFFECTS_RETENTION_DAYS"):
        value = user.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            problems.append(Error(f"RECOVERY['{key}'] must be a positive number.",
                                  id="recovery.E005"))
    retention = user.get("RETENTION_DAYS")
    if retention is not None:
        closed = ("resolved", "discarded", "compensated")
        if not isinstance(retention, dict) or any(
                status not in closed or not (days is None or (isinstance(days, (int, float))
                                                              and days > 0))
                for status, days in retention.items()):
            problems.append(Error(
                f"RECOVERY['RETENTION_DAYS'] is invalid: {retention!r}.",
                hint="A dict of closed statuses (resolved, discarded, compensated) to a positive "
                     "number of days, or None to keep them until a purge names an age. Parked "
                     "letters have no retention: purging them needs --include-parked "
                     "--older-than.",
                id="recovery.E011",
            ))
    problems.extend(_check_shared_state(user))
    problems.extend(_check_metrics_access(user))
    problems.extend(_check_metrics_backends(user))
    problems.extend(_check_broker(user))
    if "ESCALATION" in user:
        try:
            escalation = EscalationRules.from_dict(user["ESCALATION"])
        except (TypeError, ValueError) as bad:
            problems.append(Error(
                f"RECOVERY['ESCALATION'] is invalid: {bad}.",
                hint="See docs/escalation.md for the keys and their defaults.",
                id="recovery.E015",
            ))
        else:
            # Refused at delivery too (recovery.observe.notify): say so before incidents pile up.
            problems.extend(Error(message, hint=hint, id="recovery.E026")
                            for message, hint in webhook_signing.problems(
                                escalation.webhook_url, escalation.webhook_secret,
                                debug=settings.DEBUG))
    if "WATCHDOG" in user:
        try:
            WatchdogPolicy.from_dict(user["WATCHDOG"])
        except ValueError as exc:
            problems.append(Error(
                f"RECOVERY['WATCHDOG'] is invalid: {exc}",
                hint="A dict of INTERVAL_SECONDS, TASK_DEADLINE_SECONDS, "
                     "SAGA_STEP_TIMEOUT_SECONDS, REPLAYING_AFTER_SECONDS, OUTBOX_AFTER_SECONDS "
                     "(positive seconds, or None to turn that check off) and "
                     "SAGA_STEP_MAX_REDISPATCHES (an integer >= 0); keys left out keep their "
                     "defaults (docs/watchdog.md).",
                id="recovery.E016",
            ))
    visibility = conf.get("VISIBILITY_TIMEOUT_SECONDS")
    broker_delay = conf.get("BROKER_DELAY_MAX_SECONDS")
    # A value that is not a number was reported as E006 above; comparing it would crash.
    if all(isinstance(v, (int, float)) for v in (visibility, broker_delay)) and \
            broker_delay >= visibility:
        problems.append(Warning(
            "RECOVERY['BROKER_DELAY_MAX_SECONDS'] is not below the visibility timeout: long "
            "retries would wait as broker ETA messages past the visibility timeout.",
            hint="Keep BROKER_DELAY_MAX_SECONDS well below VISIBILITY_TIMEOUT_SECONDS.",
            id="recovery.W001",
        ))
    return problems


def _check_broker(user: dict) -> list:
    problems = []
    if user.get("BROKER_TOPOLOGY", "auto") not in ("auto", "off"):
        problems.append(Error(f"RECOVERY['BROKER_TOPOLOGY'] is {user['BROKER_TOPOLOGY']!r}.",
                              hint='"auto" (the default) or "off" (docs/brokers.md).',
                              id="recovery.E030"))
    limit, cap = conf.get("BROKER_DELIVERY_LIMIT"), conf.get("MAX_DELIVERIES")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        problems.append(Error("RECOVERY['BROKER_DELIVERY_LIMIT'] must be an integer >= 1.",
                              id="recovery.E031"))
    elif isinstance(cap, int) and limit <= cap:
        problems.append(Error(
            f"RECOVERY['BROKER_DELIVERY_LIMIT'] ({limit}) is not above MAX_DELIVERIES ({cap}): "
            "the broker (RabbitMQ's delivery limit, SQS's maxReceiveCount) would dead-letter a "
            "crash-looping task before recovery parks it with its history.",
            hint="Keep BROKER_DELIVERY_LIMIT a few deliveries above MAX_DELIVERIES.",
            id="recovery.E031"))
    if conf.get("BROKER_TOPOLOGY") == "auto":
        app = current_celery_app
        if topology.broker_kind(app.conf.broker_url) == topology.AMQP and app.conf.task_queues:
            unprotected = topology.missing_protection(app.conf.task_queues)
            if unprotected:
                problems.append(Warning(
                    f"The RabbitMQ queues {', '.join(unprotected)} have no x-delivery-limit or "
                    "no x-dead-letter-exchange: a task that kills its worker while the "
                    "database is down loops there for ever.",
                    hint="Give them the arguments of "
                         "recovery.delivery.topology.quorum_queue_arguments() "
                         "(docs/brokers.md), or leave task_queues unset.",
                    id="recovery.W020"))
    return problems


def _check_shared_state(user: dict) -> list:
    problems = []
    circuits = user.get("CIRCUITS")
    if circuits is not None:
        if not isinstance(circuits, dict):
            problems.append(Error(
                f"RECOVERY['CIRCUITS'] must be a dict of dependency name to circuit policy, "
                f"not {type(circuits).__name__}.",
                hint='e.g. {"payments-api": {"minimum_calls": 10, "open_seconds": 30}} '
                     "(docs/fallbacks.md).",
                id="recovery.E012",
            ))
        else:
            for name, values in circuits.items():
                try:
                    if not isinstance(values, CircuitPolicy):
                        if not isinstance(values, dict):
                            raise ValueError(f"expected a dict of CircuitPolicy fields, not "
                                             f"{type(values).__name__}")
                        CircuitPolicy.from_dict(values)
                except (TypeError, ValueError) as exc:
                    problems.append(Error(
                        f"RECOVERY['CIRCUITS'][{name!r}] is not a valid circuit policy: {exc}",
                        hint="Fields: failure_rate_threshold (0-1], minimum_calls, "
                             "window_seconds, open_seconds, half_open_max_calls "
                             "(docs/fallbacks.md).",
                        id="recovery.E012",
                    ))
    url = user.get("SHARED_STATE_URL")
    if url is not None and not (url == "database" or (
            isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")))):
        problems.append(Error(
            f"RECOVERY['SHARED_STATE_URL'] is {url!r}: it must be a redis:// URL, "
            f"\"database\", or None.",
            hint="None uses the broker's Redis when the broker is Redis, else the database "
                 "(docs/settings.md).",
            id="recovery.E013",
        ))
    port = user.get("METRICS_PORT")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        problems.append(Error(
            f"RECOVERY['METRICS_PORT'] is {port!r}: it must be a TCP port (1-65535) or None.",
            hint="Give each worker on a host its own port, e.g. 9808 (docs/metrics.md).",
            id="recovery.E014",
        ))
    return problems


_METRICS_TOKEN_MIN_CHARS = 32


def _check_metrics_access(user: dict) -> list:
    """Who may scrape /metrics (recovery.observe.views): a guessable token or an allow-list entry that
    is not a network would open it, or shut out Prometheus, without a word."""
    problems = []
    token = user.get("METRICS_TOKEN")
    if token is not None and (not isinstance(token, str)
                              or len(token) < _METRICS_TOKEN_MIN_CHARS):
        problems.append(Error(
            f"RECOVERY['METRICS_TOKEN'] must be a string of at least {_METRICS_TOKEN_MIN_CHARS} "
            f"characters, or None.",
            hint="Generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))', "
                 "and give Prometheus the same as its bearer token (docs/metrics.md).",
            id="recovery.E025",
        ))
    networks = user.get("METRICS_ALLOWED_IPS")
    if networks is not None:
        # A bare string would be read character by character: it must be a list too.
        bad = ([n for n in networks if not _is_network(n)]
               if isinstance(networks, (list, tuple)) else [networks])
        if bad:
            problems.append(Error(
                f"RECOVERY['METRICS_ALLOWED_IPS'] has entries that are not IP networks: "
                f"{', '.join(map(repr, bad))}.",
                hint='A list of addresses or CIDRs, e.g. ["127.0.0.1/32", "10.0.0.0/8"]; an '
                     "empty list allows the bearer token only (docs/metrics.md).",
                id="recovery.E025",
            ))
    return problems


def _check_metrics_backends(user: dict) -> list:
    """Which exporters count the events, and how CloudWatch is reached: a typo would
    silently count nothing, and a missing boto3 would only show in the worker's log."""
    problems = []
    listed = user.get("METRICS_BACKENDS", conf.DEFAULTS["METRICS_BACKENDS"])
    if (not isinstance(listed, (list, tuple))
            or any(name not in backends.KNOWN for name in listed)):
        problems.append(Error(
            f"RECOVERY['METRICS_BACKENDS'] is {listed!r}: it must be a list of "
            f"{', '.join(map(repr, backends.KNOWN))}.",
            hint='e.g. ["prometheus", "cloudwatch-emf"]; an empty list counts no event '
                 "(docs/cloudwatch.md).",
            id="recovery.E040",
        ))
        listed = ()
    try:
        options = CloudWatchOptions.from_dict(user.get("CLOUDWATCH"))
    except ValueError as exc:
        problems.append(Error(
            f"RECOVERY['CLOUDWATCH'] is invalid: {exc}.",
            hint="See docs/cloudwatch.md#settings for the keys and their defaults.",
            id="recovery.E041",
        ))
        return problems
    on = backends.CLOUDWATCH_EMF in listed
    if on and options.put_metric_data and find_spec("boto3") is None:
        problems.append(Error(
            "RECOVERY['CLOUDWATCH']['PUT_METRIC_DATA'] is on but boto3 is not installed: "
            "no metric would be sent.",
            hint="pip install 'celery-recovery[cloudwatch]' (boto3), or turn PUT_METRIC_DATA "
                 "off and let a log agent ship the EMF lines.",
            id="recovery.E042",
        ))
    if user.get("CLOUDWATCH") and not on:
        problems.append(Warning(
            "RECOVERY['CLOUDWATCH'] is set but 'cloudwatch-emf' is not in "
            "RECOVERY['METRICS_BACKENDS']: nothing is sent to CloudWatch.",
            hint='Add "cloudwatch-emf" to METRICS_BACKENDS, or remove CLOUDWATCH.',
            id="recovery.W040",
        ))
    return problems


@register()
def check_rehearsals(app_configs=None, **kwargs):
    """Rehearsals inject real failures: a production settings file must not allow them."""
    user = getattr(settings, "RECOVERY", None)
    if not isinstance(user, dict) or "REHEARSALS_ENABLED" not in user:
        return []
    value = user["REHEARSALS_ENABLED"]
    if not isinstance(value, bool):
        return [Error("RECOVERY['REHEARSALS_ENABLED'] must be True or False.",
                      id="recovery.E050")]
    if value and not settings.DEBUG:
        return [Warning(
            "RECOVERY['REHEARSALS_ENABLED'] is on with DEBUG off: anyone with the "
            "run_rehearsal permission can make tasks fail here.",
            hint="Turn rehearsals on in staging and other non-production environments only; "
                 "if this is one, silence this check with SILENCED_SYSTEM_CHECKS = "
                 "['recovery.W050'].",
            id="recovery.W050")]
    return []


def _is_network(value: object) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


@register()
def check_private_internals(app_configs=None, **kwargs):
    """The kombu and django-celery-results internals recovery relies on; a worker also
    refuses to start without them (recovery.delivery.housekeeping), this says so before a deploy."""
    problems = []
    if find_spec("redis") is not None and (problem := visibility.missing_internals(
            kombu_redis.Channel)):
        problems.append(Error(problem, id="recovery.E017"))
    if apps.is_installed("django_celery_results"):
        from django_celery_results.backends.database import DatabaseBackend

        if problem := pg_fastpath.missing_internals(DatabaseBackend):
            problems.append(Error(problem, id="recovery.E018"))
    return problems


_PICKLE_NAMES = ("pickle", "python-serialize")  # kombu takes names and content types
_SERIALIZER_SETTINGS = ("CELERY_TASK_SERIALIZER", "CELERY_RESULT_SERIALIZER",
                        "CELERY_EVENT_SERIALIZER")
_ACCEPT_SETTINGS = ("CELERY_ACCEPT_CONTENT", "CELERY_RESULT_ACCEPT_CONTENT")


def _is_pickle(value: object) -> bool:
    return any(name in str(value) for name in _PICKLE_NAMES)


@register()
def check_celery_serialization(app_configs=None, **kwargs):
    """Pickle anywhere is code execution for whoever can write a message, a result row or an
    event, and makes dead letters opaque: refuse it in what is accepted and what is written."""
    problems = []
    for name in _ACCEPT_SETTINGS:
        accept = getattr(settings, name, None)
        if accept is not None and any(_is_pickle(item) for item in accept):
            problems.append(Error(
                f"{name} accepts pickle: a message or a stored result can run arbitrary code, "
                f"and dead letters must be JSON to be inspected and edited.",
                hint=f"Set {name} = ['json'] and CELERY_TASK_SERIALIZER = 'json'.",
                id="recovery.E010",
            ))
    for name in _SERIALIZER_SETTINGS:
        value = getattr(settings, name, None)
        if value is not None and _is_pickle(value):
            problems.append(Error(
                f"{name} is pickle: what it writes is code execution for whoever reads it "
                f"back, and the workers (accepting JSON only) refuse it.",
                hint=f"Set {name} = 'json'.",
                id="recovery.E010",
            ))
    return problems
