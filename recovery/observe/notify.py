"""Deliver incident notifications: a signed JSON webhook and e-mail to ``ADMINS``.

:mod:`recovery.observe.escalation` writes one :class:`~recovery.models.IncidentNotification`
row per channel when an incident opens (and a webhook row when it is resolved); this
module sends them. Each worker runs a :class:`Deliverer` thread that claims due rows
with ``SKIP LOCKED``, so workers share the work and never send one row twice at once,
and that retries a failing channel with capped exponential backoff, up to
``MAX_ATTEMPTS``. It is a thread of its own because a webhook may take seconds to
answer, and the worker's event loop must not wait for it.

Delivery is at least once: a worker killed between the receiver's 2xx and the row's
commit sends it again. Receivers deduplicate on the body's ``delivery_id``, also sent as
the signed ``webhook-id`` header, stable per (incident, channel, event).

The webhook body is JSON, signed per the Standard Webhooks specification
(:mod:`recovery.observe.webhook_signing`: ``webhook-id``, ``webhook-timestamp``,
``webhook-signature``) with ``WEBHOOK_SECRET``; :func:`verify_signature` is the receiver's
side, and any Standard Webhooks library verifies it too. A webhook that is ``http://``
outside DEBUG, or whose secret is shorter than 32 bytes, is refused (and the system check
``recovery.E026`` says so at start-up).
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections import deque
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.mail import get_connection, mail_admins
from django.db.models import Exists, OuterRef
from django.db import Error as DatabaseError
from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from . import metrics, webhook_signing
from ..core.backoff import Jitter, backoff_delay
from .escalation import EscalationRules, incident_link, rules
from ..store.models import IncidentNotification
from ..core.names import logger_for

__all__ = ["deliver_due", "payload", "verify_signature", "Deliverer", "DeliveryError",
           "flush_counts", "EVENT_HEADER"]

logger = logger_for(__name__)

EVENT_HEADER = "X-Recovery-Event"
_LETTERS_IN_PAYLOAD = 50
_ERROR_MAX_CHARS = 2000
#: How long an SMTP server may take per operation (Django's default is to wait forever).
_MAIL_TIMEOUT_SECONDS = 10.0


class DeliveryError(Exception):
    """A channel did not take the notification; ``retry_after`` is the receiver's hint."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def verify_signature(secret: str, body: bytes, headers: Any, *,
                     tolerance_seconds: float = 300.0, now: float | None = None) -> bool:
    """The receiver's check of a delivery: ``headers`` (the request's, any case) hold a
    Standard Webhooks signature of ``body`` with ``secret``, made within the tolerance."""
    return webhook_signing.verify(secret, body, headers, tolerance_seconds=tolerance_seconds,
                                  now=now)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def payload(note: IncidentNotification, chosen: EscalationRules) -> dict[str, Any]:
    """The incident as a ticket bridge needs it, read when sent (current count and times)."""
    incident = note.incident
    letters = list(incident.letters.order_by("-id").values_list("id", flat=True)[:_LETTERS_IN_PAYLOAD])
    return {
        "type": f"incident.{note.event}",
        "delivery_id": str(note.pk),
        "incident": {
            "id": incident.pk,
            "fingerprint": incident.fingerprint,
            "status": incident.status,
            "reason": incident.reason,
            "severity": incident.severity,
            "title": incident.title,
            "task": incident.task_name,
            "kind": incident.kind,
            "queue": incident.queue,
            "count": incident.count,
            "first_seen_at": _iso(incident.first_seen_at),
            "last_seen_at": _iso(incident.last_seen_at),
            "acknowledged_at": _iso(incident.acknowledged_at),
            "acknowledged_by": incident.acknowledged_by,
            "resolved_at": _iso(incident.resolved_at),
            "resolved_by": incident.resolved_by,
            "saga_run": incident.saga_run_id,
            "letters": letters,
            "letter_count": incident.letters.count(),
            "url": incident_link(incident.pk, chosen.admin_base_url),
        },
        "diagnostics": incident.details,
    }


def _post_webhook(note: IncidentNotification, chosen: EscalationRules) -> None:
    if not chosen.webhook_url or not chosen.webhook_secret:
        raise DeliveryError("the webhook is no longer configured (RECOVERY['ESCALATION']"
                            "['WEBHOOK_URL'])", retry_after=None)
    refused = webhook_signing.problems(chosen.webhook_url, chosen.webhook_secret,
                                       debug=settings.DEBUG)
    if refused:
        # Kept pending and retried: fixing the setting delivers it (recovery.E026 at start-up).
        raise DeliveryError("refused to send: " + " ".join(f"{msg} {hint}" for msg, hint in refused))
    body = json.dumps(payload(note, chosen), default=str, sort_keys=True).encode("utf-8")
    try:
        request = urllib.request.Request(chosen.webhook_url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            "User-Agent": "celery-recovery",
            EVENT_HEADER: f"incident.{note.event}",
            **webhook_signing.headers(chosen.webhook_secret, str(note.pk), body),
        })
        with urllib.request.urlopen(request, timeout=chosen.webhook_timeout_seconds) as response:
            response.read(1024)
    except urllib.error.HTTPError as exc:
        retry_after = exc.headers.get("Retry-After") if exc.headers else None
        try:
            hint = float(retry_after) if retry_after else None
        except ValueError:
            hint = None
        raise DeliveryError(f"HTTP {exc.code} from the webhook", retry_after=hint) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DeliveryError(f"webhook unreachable: {getattr(exc, 'reason', exc)}") from exc
    except http.client.HTTPException as exc:
        raise DeliveryError(f"webhook answered badly: {type(exc).__name__}: {exc}") from exc


def _email_text(note: IncidentNotification, chosen: EscalationRules) -> tuple[str, str]:
    data = payload(note, chosen)
    incident, details = data["incident"], data["diagnostics"] or {}
    # Mail refuses a subject with a newline; exception messages often have one.
    subject = " ".join(f"Incident #{incident['id']} {note.event}: {incident['title']}".split())[:200]
    lines = [
        incident["title"], "",
        f"Incident:   {incident['url']}",
        f"Reason:     {incident['reason']} ({incident['severity']})",
        f"Task:       {incident['task'] or '-'}   queue: {incident['queue'] or '-'}",
        f"Seen:       {incident['count']} time(s), first {incident['first_seen_at']}, "
        f"last {incident['last_seen_at']}",
    ]
    for name, url in (details.get("links") or {}).items():
        lines.append(f"{name.capitalize() + ':':<12}{url}")
    exception = details.get("exception") or {}
    if exception:
        lines += ["", f"Exception:  {exception.get('type')}: {exception.get('message')}"]
    classification = details.get("classification")
    if classification:
        lines.append(f"Classified: {classification.get('kind')}, "
                     f"{'permanent' if classification.get('permanent') else 'transient'}: "
                     f"{classification.get('reason')}")
    if "args" in details or "kwargs" in details:
        lines.append(f"Arguments:  args={json.dumps(details.get('args'), default=str)} "
                     f"kwargs={json.dumps(details.get('kwargs'), default=str)}")
    for key, value in details.items():
        if key not in {"links", "exception", "classification", "args", "kwargs", "history",
                       "traceback"}:
            lines.append(f"{key}: {json.dumps(value, default=str)}")
    history = details.get("history") or []
    if history:
        lines += ["", "Attempts:"]
        for entry in history:
            lines.append(f"  #{entry.get('attempt')} at {entry.get('at')}: "
                         f"{entry.get('exception_type')}: {entry.get('exception_message')}")
    if details.get("traceback"):
        lines += ["", "Traceback:", details["traceback"]]
    return subject, "\n".join(lines)


def _send_email(note: IncidentNotification, chosen: EscalationRules) -> None:
    if not getattr(settings, "ADMINS", None):
        raise DeliveryError("settings.ADMINS is empty")
    subject, body = _email_text(note, chosen)
    try:
        timeout = getattr(settings, "EMAIL_TIMEOUT", None) or _MAIL_TIMEOUT_SECONDS
        mail_admins(subject, body, fail_silently=False,
                    connection=get_connection(fail_silently=False, timeout=timeout))
    except Exception as exc:  # noqa: BLE001 - SMTP errors, refused connections, timeouts
        raise DeliveryError(f"mail not sent: {exc}") from exc


_SENDERS = {
    IncidentNotification.Channel.WEBHOOK: _post_webhook,
    IncidentNotification.Channel.EMAIL: _send_email,
}


def _next_delay(attempts: int, chosen: EscalationRules, hint: float | None) -> float:
    delay = backoff_delay(attempts, initial=2.0, multiplier=2.0, cap=chosen.max_backoff_seconds,
                          jitter=Jitter.EQUAL)
    if hint is not None:
        delay = max(delay, min(hint, chosen.max_backoff_seconds))
    return delay


def _claim(chosen: EscalationRules) -> IncidentNotification | None:
    """Take the next due row for one attempt, in a short transaction of its own.

    The row's ``next_attempt_at`` moves past the send's timeout (a lease), so no other
    worker takes it while it is being sent, and nothing stays locked (on SQLite: the whole
    database) while a webhook or a mail server makes us wait. A "resolved" row waits until
    its channel has sent (or given up) the "opened" one: a ticket must not open after it
    was closed.
    """
    opened_unsent = IncidentNotification.objects.filter(
        incident=OuterRef("incident"), channel=OuterRef("channel"),
        event=IncidentNotification.Event.OPENED, status=IncidentNotification.Status.PENDING)
    now = timezone.now()
    with transaction.atomic():
        note = (IncidentNotification.objects.select_for_update(skip_locked=True, of=("self",))
                .filter(status=IncidentNotification.Status.PENDING, next_attempt_at__lte=now)
                .exclude(Q(event=IncidentNotification.Event.RESOLVED) & Exists(opened_unsent))
                .order_by("next_attempt_at", "id").first())
        if note is None:
            return None
        note.attempts += 1
        note.next_attempt_at = now + timedelta(seconds=_lease_seconds(chosen))
        note.save(update_fields=["attempts", "next_attempt_at"])
    return note


def _lease_seconds(chosen: EscalationRules) -> float:
    return 2 * chosen.webhook_timeout_seconds + _MAIL_TIMEOUT_SECONDS + 30


_THREAD_NAME = "recovery-notify"
_outcomes: deque[tuple[str, str]] = deque(maxlen=10000)


def _count(channel: str, outcome: str) -> None:
    # prometheus_client's multiprocess values share one lock per process. A prefork worker
    # forks new pool children from its main process; a fork while this thread held that
    # lock would leave the child's copy locked for ever. So this thread only queues its
    # counts, and the main thread records them (flush_counts, from the housekeeping timer).
    if threading.current_thread().name == _THREAD_NAME:
        _outcomes.append((channel, outcome))
    else:
        metrics.notification_outcome(channel, outcome)


_running: dict[str, Deliverer] = {}


def start_delivering(hostname: str, **_: Any) -> None:
    """On ``worker_started``: one delivery thread per worker."""
    if hostname not in _running:
        _running[hostname] = Deliverer().start()


def stop_delivering(hostname: str, timeout_seconds: float = 10.0, **_: Any) -> None:
    """On ``worker_stopping``: stop the worker's delivery thread, waiting at most
    ``timeout_seconds`` for a delivery in flight."""
    deliverer = _running.pop(hostname, None)
    if deliverer is not None:
        deliverer.stop(timeout=timeout_seconds)


def on_heartbeat(**_: Any) -> None:
    """On ``worker_heartbeat``: count what the delivery thread did since the last one."""
    flush_counts()


def flush_counts() -> None:
    """Record the delivery outcomes the Deliverer thread queued (call from the main thread)."""
    while _outcomes:
        try:
            channel, outcome = _outcomes.popleft()
        except IndexError:
            return
        metrics.notification_outcome(channel, outcome)


def _record(note: IncidentNotification, chosen: EscalationRules, error: Exception | None) -> bool:
    if error is None:
        note.status = IncidentNotification.Status.SENT
        note.sent_at = timezone.now()
        note.last_error = ""
        _count(note.channel, "sent")
    else:
        note.last_error = (str(error) or type(error).__name__)[:_ERROR_MAX_CHARS]
        if note.attempts >= chosen.max_attempts:
            note.status = IncidentNotification.Status.FAILED
            _count(note.channel, "failed")
            logger.error("recovery: gave up the %s notification of incident #%s after %d "
                         "attempts: %s", note.channel, note.incident_id, note.attempts, error)
        else:
            delay = _next_delay(note.attempts, chosen, getattr(error, "retry_after", None))
            note.next_attempt_at = timezone.now() + timedelta(seconds=delay)
            _count(note.channel, "retried")
            logger.warning("recovery: %s notification of incident #%s failed (attempt %d of "
                           "%d), next in %.0f s: %s", note.channel, note.incident_id,
                           note.attempts, chosen.max_attempts, delay, error)
    note.save(update_fields=["status", "next_attempt_at", "last_error", "sent_at"])
    return error is None


def deliver_due(limit: int = 50) -> int:
    """Send up to ``limit`` due notifications; returns how many were sent.

    Each row is claimed in a short transaction (``SKIP LOCKED`` and a lease), sent with
    no transaction open, and its outcome recorded in another: workers share the rows, no
    row is sent by two of them at once, and a channel that hangs or fails only delays its
    own rows. Any error of a channel (not only the expected ones) counts as a failed
    attempt: a row can never block the rows behind it.
    """
    chosen = rules()
    sent = 0
    for _ in range(limit):
        note = _claim(chosen)
        if note is None:
            break
        try:
            sender = _SENDERS[note.channel]
        except KeyError:
            error: Exception | None = DeliveryError(f"unknown channel {note.channel!r}")
        else:
            try:
                sender(note, chosen)
                error = None
            except DeliveryError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a bad answer must not stop delivery
                logger.warning("recovery: %s notification of incident #%s raised",
                               note.channel, note.incident_id, exc_info=True)
                error = exc
        sent += _record(note, chosen, error)
    return sent


class Deliverer:
    """The background thread of a worker (or any long-running process) that delivers."""

    def __init__(self, interval_seconds: float | None = None) -> None:
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Deliverer":
        self._thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        flush_counts()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                interval = self._interval
                try:
                    interval = interval or rules().delivery_interval_seconds
                    close_old_connections()
                    while deliver_due() and not self._stop.is_set():
                        pass
                except DatabaseError as exc:
                    logger.info("recovery: notifications not delivered yet (database: %s)", exc)
                    try:
                        connection.close()
                    except Exception:  # noqa: BLE001
                        pass
                except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                    logger.exception("recovery: delivering notifications failed")
                self._stop.wait(interval or 2.0)
        finally:
            try:
                connection.close()
            except Exception:  # noqa: BLE001
                pass

