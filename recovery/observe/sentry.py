"""Sentry: one event per parked letter, grouped into one Sentry issue per failure.

The project initialises sentry-sdk itself (``sentry_sdk.init(...)`` in its settings);
recovery only reports through the client it finds, and does nothing when there is none
or when sentry-sdk is not installed (it is the optional ``sentry`` extra).

What is sent for a letter (:func:`report_letter`):

- the exception, with its real stack frames when the letter was parked by the task's own
  process, or rebuilt from the stored type, message and traceback text when the worker's
  main process parked it (time limits, lost workers, poison messages);
- the fingerprint ``["celery-recovery", <letter fingerprint>]``, so every letter of one
  failure lands in one Sentry issue, as the admin groups them;
- tags ``recovery.task``, ``recovery.kind``, ``recovery.queue``, ``recovery.status``,
  ``recovery.permanent`` and ``recovery.fingerprint`` (and ``recovery.rehearsal`` on what a
  rehearsal caused);
- a ``dead_letter`` context: arguments and history with secrets masked
  (:mod:`recovery.core.redaction`), attempts, classification, letter id, admin links.

Secrets never leave masked: besides the masked context, the values that masking hid are
scrubbed from the frames' local variables, the exception message and the extras of the
event (sentry-sdk sends frame locals by default, and a task's frame holds its raw
arguments).

Beside sentry-sdk's own Celery integration a parked task must stay one event: the task
re-raises its exception after parking so Celery records FAILURE, and the integration would
report it again. :func:`install` (called from ``RecoveryConfig.ready``) registers a global
event processor that drops an event for an exception :func:`report_letter` already sent,
and the log lines recovery writes to announce what it already reported. Retries raise
Celery's ``Retry``, which the integration never reports.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..core import redaction
from ..core.errors import exception_path
from ..core.redaction import MASK, is_secret_key, mask
from . import escalation
from .escalation import EscalationRules
from ..core.names import logger_for

if TYPE_CHECKING:
    from ..store.models import Incident
    from ..store.parking import ParkRecord

__all__ = ["report_letter", "report_incident", "install", "was_reported"]

logger = logger_for(__name__)

#: Every event recovery sends carries this key in its hint (never in the payload).
HINT_KEY = "celery_recovery"
#: Set on an exception once its letter was reported.
REPORTED_ATTR = "__recovery_reported__"
TAG_MAX_CHARS = 200
#: Letters parked by the worker's main process have no exception object to mark; Celery
#: logs the same exception right after (an undecodable message). Such a letter drops the
#: next event of the same exception type and message within these seconds, once.
_MAIN_PROCESS_MEMORY_SECONDS = 10.0
#: Log lines recovery writes about a letter or an incident it reports itself.
_ANNOUNCEMENTS = (
    ("recovery.escalation", "recovery: incident #"),
    ("recovery.worker", "recovery: parked "),
)
_LEVELS = {"critical": "fatal", "error": "error", "warning": "warning"}

_install_lock = threading.Lock()
_installed = False
_recent_lock = threading.Lock()
_recent: deque[tuple[float, str, str]] = deque(maxlen=64)
_marked_lock = threading.Lock()
_marked: deque[BaseException] = deque(maxlen=64)  # exceptions that refuse an attribute


def _sdk() -> Any:
    try:
        import sentry_sdk
    except ImportError:
        return None
    return sentry_sdk


def _client(sentry_sdk: Any) -> Any:
    """The client that would send an event, or None (not initialised, or no DSN)."""
    client = sentry_sdk.get_client()
    if not client.is_active():
        return None
    if getattr(client, "transport", None) is None and not getattr(client, "spotlight", None):
        return None
    return client


# -- reporting -------------------------------------------------------------------------------


def report_parked(record: "ParkRecord", letter_id: int | None, exc: BaseException | None = None,
                  first_report: bool = True, **_: Any) -> None:
    """On ``letter_parked``: report the letter, once (not again when the spool drain writes
    a letter that was reported when it was spooled)."""
    if not first_report:
        return
    try:
        chosen = escalation.rules()
    except ValueError:
        return  # an invalid RECOVERY["ESCALATION"]: escalation.on_parked says so, once a letter
    if chosen.sentry:
        report_letter(record, letter_id, exc, chosen)


def report_opened_incident(incident: "Incident", occurrence: "escalation.Occurrence",
                           rules: EscalationRules, **_: Any) -> None:
    """On ``incident_opened``: report an incident that opened without a letter (a letter's
    incident is reported with the letter)."""
    if rules.sentry and occurrence.letter_id is None:
        report_incident(incident, rules)


def report_letter(record: "ParkRecord", letter_id: int | None, exc: BaseException | None = None,
                  chosen: "EscalationRules | None" = None) -> None:
    """Send one Sentry event for a letter just parked. Never raises.

    ``letter_id`` is None while the letter waits in the spool. ``exc`` is the live exception when the task's own process
    parked it: the event then has its real stack frames, and the exception is marked so the
    Celery integration's report of the same exception is dropped.
    """
    sentry_sdk = _sdk()
    if sentry_sdk is None:
        return
    try:
        client = _client(sentry_sdk)
        if client is None:
            return
        chosen = escalation.rules() if chosen is None else chosen
        if not chosen.sentry:
            return
        _send_letter(sentry_sdk, client, record, letter_id, exc, chosen)
    except Exception:  # noqa: BLE001 - a broken exporter never stops parking
        logger.warning("recovery: could not report %s[%s] to Sentry", record.task_name,
                       record.task_id, exc_info=True)


def report_incident(incident: "Incident", chosen: "EscalationRules | None" = None) -> None:
    """Send one Sentry event for an incident that opened without a letter. Never raises.

    Watchdog findings and sagas that need a human; an incident opened by a letter is
    already in Sentry as that letter's event.
    """
    sentry_sdk = _sdk()
    if sentry_sdk is None:
        return
    try:
        if _client(sentry_sdk) is None:
            return

        chosen = escalation.rules() if chosen is None else chosen
        if not chosen.sentry:
            return
        tags = _tags({
            "recovery.incident_reason": incident.reason,
            "recovery.task": incident.task_name,
            "recovery.kind": incident.kind,
            "recovery.queue": incident.queue,
            "recovery.status": incident.status,
            "recovery.severity": incident.severity,
            "recovery.rehearsal": getattr(incident, "rehearsal", ""),
        })
        fingerprint = ["celery-recovery", "incident", incident.fingerprint]
        level = _LEVELS.get(incident.severity, "error")
        context = {
            "id": incident.pk,
            "title": incident.title,
            "reason": incident.reason,
            "severity": incident.severity,
            "status": incident.status,
            "count": incident.count,
            "first_seen_at": _iso(incident.first_seen_at),
            "last_seen_at": _iso(incident.last_seen_at),
            "saga_run_id": incident.saga_run_id,
            "details": mask(incident.details or {}),
            "link": escalation.incident_link(incident.pk, chosen.admin_base_url),
        }
        event = {
            "message": incident.title,
            "level": level,
            "logger": "celery-recovery",
            "fingerprint": fingerprint,
            "tags": dict(tags),
            "contexts": {"incident": context},
        }
        if incident.task_name:
            event["transaction"] = incident.task_name
        with sentry_sdk.new_scope() as scope:
            scope.add_event_processor(_final(fingerprint, tags, level, (), None))
            sentry_sdk.capture_event(event, hint={HINT_KEY: True})
    except Exception:  # noqa: BLE001
        logger.warning("recovery: could not report incident %s to Sentry",
                       getattr(incident, "pk", None), exc_info=True)


def _send_letter(sentry_sdk: Any, client: Any, record: "ParkRecord", letter_id: int | None,
                 exc: BaseException | None, chosen: "EscalationRules") -> None:
    diagnostics = escalation.letter_diagnostics(record, letter_id, chosen.admin_base_url)
    fp = escalation._fingerprint(record)
    fingerprint = ["celery-recovery", fp]
    level = "fatal" if escalation._is_critical(record.task_name, chosen) else "error"
    tags = _tags({
        "recovery.task": record.task_name,
        "recovery.kind": record.kind,
        "recovery.queue": record.queue,
        "recovery.status": "parked",
        "recovery.permanent": "true" if record.permanent else "false",
        "recovery.fingerprint": fp,
        "recovery.rehearsal": record.rehearsal,
    })
    masked_args, masked_kwargs = diagnostics["args"], diagnostics["kwargs"]
    secrets = _secrets(record.args, masked_args) + _secrets(record.kwargs, masked_kwargs)
    links = diagnostics.get("links") or {}
    context = {**diagnostics, "fingerprint": fp,
               "admin_url": links.get("letter") or links.get("group")}
    if exc is not None:
        from sentry_sdk.utils import event_from_exception

        event, hint = event_from_exception(
            exc, client_options=client.options,
            mechanism={"type": "celery-recovery", "handled": False},
        )
        # The frames carry the traceback; the stored text would only repeat it.
        context.pop("traceback", None)
    else:
        event, hint = _event_from_record(record), {}
    hint[HINT_KEY] = True
    event.update({
        "level": level,
        "logger": "celery-recovery",
        "transaction": record.task_name,
        "fingerprint": fingerprint,
        "tags": dict(tags),
    })
    event.setdefault("contexts", {})["dead_letter"] = context
    with sentry_sdk.new_scope() as scope:
        scope.add_event_processor(_final(fingerprint, tags, level, secrets,
                                         (masked_args, masked_kwargs)))
        sentry_sdk.capture_event(event, hint=hint)
    # Only once ours is on its way: if capturing failed, the integration's copy must pass.
    if exc is not None:
        _mark(exc)
    else:
        _remember(record)


def _event_from_record(record: "ParkRecord") -> dict:
    """An exception entry from what the letter stores (no live exception to read)."""
    if not record.exception_type:
        return {"message": f"{record.task_name}: {record.exception_message or record.reason}"}
    module, _, name = record.exception_type.rpartition(".")
    value: dict[str, Any] = {
        "type": name,
        "value": record.exception_message,
        "mechanism": {"type": "celery-recovery", "handled": False},
    }
    if module:
        value["module"] = module
    return {"exception": {"values": [value]}}


def _tags(values: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value)[:TAG_MAX_CHARS] for key, value in values.items()
            if value not in (None, "")}


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _final(fingerprint: list, tags: dict, level: str, secrets: Any,
           masked: tuple[list, dict] | None) -> Any:
    """The last processor of our event: it runs after the task's scope processors (the
    Celery integration's among them), so what it sets is what Sentry receives."""

    def process(event: dict, hint: dict) -> dict:
        event["fingerprint"] = list(fingerprint)
        event.setdefault("tags", {}).update(tags)
        event["level"] = level
        if masked is not None:
            job = (event.get("extra") or {}).get("celery-job")
            if isinstance(job, dict):
                # With send_default_pii the integration adds the raw arguments here.
                for key, value in zip(("args", "kwargs"), masked):
                    if key in job and not isinstance(job[key], str):
                        job[key] = value
            # Frame locals are masked by name even when no argument was secret.
            for key in ("exception", "threads", "extra", "breadcrumbs", "message", "logentry"):
                if key in event:
                    event[key] = _scrub(event[key], secrets)
            contexts = event.get("contexts")
            if isinstance(contexts, dict) and "dead_letter" in contexts:
                contexts["dead_letter"] = _scrub(contexts["dead_letter"], secrets)
        return event

    return process


# -- secrets -----------------------------------------------------------------------------


_secrets = redaction.hidden_values
_scrub_text = redaction.scrub_text


def _scrub(value: Any, secrets: Any, full: bool = False, depth: int = 0) -> Any:
    """``value`` with every secret masked inside its text.

    ``full`` (frame locals, below any ``vars`` key): also mask by key name, numbers equal
    to a secret, and objects whose repr shows one (they become that repr, masked).
    Elsewhere only text is touched, so line numbers and timestamps keep their types.
    """
    if depth > 20:
        return value
    if isinstance(value, str):
        return _scrub_text(value, secrets)
    if isinstance(value, Mapping):
        return {key: (MASK if full and is_secret_key(key) and item not in (None, "")
                      else _scrub(item, secrets, full or key == "vars", depth + 1))
                for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(item, secrets, full, depth + 1) for item in value]
    if not full or value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return MASK if any(not isinstance(s, str) and s == value for s in secrets) else value
    if isinstance(value, (bytes, bytearray)):
        return _scrub_text(bytes(value).decode("utf-8", "replace"), secrets)
    try:
        from sentry_sdk.utils import safe_repr

        shown = safe_repr(value)
    except Exception:  # noqa: BLE001
        return "<unrepresentable>"
    scrubbed = _scrub_text(shown, secrets)
    return value if scrubbed == shown else scrubbed


# -- deduplication ---------------------------------------------------------------------------


def _mark(exc: BaseException) -> None:
    try:
        setattr(exc, REPORTED_ATTR, True)
    except Exception:  # noqa: BLE001 - an exception class that refuses attributes
        with _marked_lock:
            _marked.append(exc)


def was_reported(exc: BaseException | None) -> bool:
    """Whether :func:`report_letter` already sent ``exc`` as a letter's event."""
    if exc is None:
        return False
    try:
        if getattr(exc, REPORTED_ATTR, False) is True:
            return True
    except Exception:  # noqa: BLE001
        pass
    with _marked_lock:
        return any(seen is exc for seen in _marked)


def _remember(record: "ParkRecord") -> None:
    with _recent_lock:
        _recent.append((time.monotonic(), record.exception_type,
                        (record.exception_message or "")[:200]))


def _recently_reported(exc: BaseException) -> bool:
    if not _recent:
        return False
    key = (exception_path(exc), str(exc).replace("\x00", "\\x00")[:200])
    horizon = time.monotonic() - _MAIN_PROCESS_MEMORY_SECONDS
    with _recent_lock:
        for entry in list(_recent):
            if entry[0] >= horizon and entry[1:] == key:
                _recent.remove(entry)
                return True
    return False


def _announces_report(record: Any) -> bool:
    name = getattr(record, "name", "")
    msg = getattr(record, "msg", "")
    if not isinstance(msg, str) or not any(
            name == logger_name and msg.startswith(prefix)
            for logger_name, prefix in _ANNOUNCEMENTS):
        return False
    try:
        return escalation.rules().sentry
    except ValueError:
        return False


def _drop_duplicates(event: dict, hint: dict | None) -> dict | None:
    """Global event processor: drop what recovery already reported as a letter."""
    if not hint or hint.get(HINT_KEY):
        return event
    try:
        exc_info = hint.get("exc_info")
        exc = exc_info[1] if exc_info else None
        if exc is not None and (was_reported(exc) or _recently_reported(exc)):
            return None
        log_record = hint.get("log_record")
        if log_record is not None and _announces_report(log_record):
            return None
    except Exception:  # noqa: BLE001 - when in doubt, let the event through
        logger.debug("recovery: Sentry duplicate check failed", exc_info=True)
    return event


def install() -> bool:
    """Register the duplicate filter with sentry-sdk, once per process.

    Called by ``RecoveryConfig.ready``; returns False when sentry-sdk is not installed.
    The filter is global (it sees the events of every client the project initialises,
    before or after this call) and cheap: it reads an event's hint, nothing else.
    """
    global _installed
    sentry_sdk = _sdk()
    if sentry_sdk is None:
        return False
    with _install_lock:
        if not _installed:
            from sentry_sdk.scope import add_global_event_processor

            add_global_event_processor(_drop_duplicates)
            _installed = True
    return True
