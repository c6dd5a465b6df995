"""What must happen in the worker's main process, where the pool child cannot act.

* ``RecoveryConsumer`` turns messages Celery would drop (unknown task name,
  undecodable body, invalid envelope) into ``poison`` dead letters with the raw
  body, and keeps consuming.
* ``RecoveryRequest`` counts redeliveries per task id and parks a task that
  keeps killing its worker (or hitting the hard time limit) instead of running
  it forever; it also parks bodies the pool child could not decode.
* ``Housekeeping`` (a consumer bootstep, in :mod:`recovery.housekeeping`) extends the
  Redis visibility of every message this worker holds and, on a thread of its own,
  publishes due retries, drains the dead-letter spool, relays the outbox.

``recovery.setup(app)`` installs all three.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import Ignore, Reject, Retry, Terminated, TimeLimitExceeded
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from celery.worker.state import task_ready

from . import conf
from .kinds import FailureKind

__all__ = ["RecoveryConsumer", "RecoveryRequest", "Housekeeping", "park_poison"]

logger = logging.getLogger(__name__)


def _raw_text(body: Any) -> str:
    if body is None:
        return ""
    if isinstance(body, str):
        return body
    if isinstance(body, memoryview):
        body = body.tobytes()
    if isinstance(body, (bytes, bytearray)):
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(bytes(body)).decode("ascii")
    try:
        return json.dumps(body, default=repr)
    except (TypeError, ValueError):
        return repr(body)


def _body_bytes(body: Any) -> bytes:
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, memoryview):
        return body.tobytes()
    return _raw_text(body).encode("utf-8", "backslashreplace")


def _decoded_args(body: Any, content_type: str) -> tuple[list, dict]:
    """Best effort: the args/kwargs of a protocol-2 JSON body, for a later replay."""
    if content_type and "json" not in content_type:
        return [], {}
    try:
        data = json.loads(_body_bytes(body))
        args, kwargs, _embed = data
        if isinstance(args, list) and isinstance(kwargs, dict):
            return args, kwargs
    except Exception:  # noqa: BLE001 - it is a poison message: anything may be wrong
        pass
    return [], {}


def park_poison(*, task_id: str | None, task_name: str, body: Any, content_type: str,
                headers: dict | None, delivery_info: dict | None, exc: BaseException | None,
                reason: str, kind: FailureKind = FailureKind.POISON, hostname: str = "") -> Any:
    """Park a message that cannot run as a dead letter keeping its raw body."""
    from .parking import ParkRecord, park
    from .task import exception_path

    raw = _raw_text(body)
    if not task_id:
        task_id = "poison-" + hashlib.sha256(_body_bytes(body)).hexdigest()
    args, kwargs = _decoded_args(body, content_type or "")
    delivery_info = delivery_info or {}
    safe_headers = json.loads(json.dumps(headers or {}, default=str))
    record = ParkRecord(
        task_id=task_id,
        task_name=task_name or "<unknown>",
        kind=kind.value,
        permanent=True,
        reason=reason,
        exception_type=exception_path(exc) if exc is not None else "",
        exception_message=str(exc) if exc is not None else reason,
        args=args,
        kwargs=kwargs,
        headers=safe_headers,
        raw_body=raw,
        content_type=content_type or "",
        history=[{
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "attempt": 1,
            "replay": 0,
            "exception_type": exception_path(exc) if exc is not None else "",
            "exception_message": (str(exc) if exc is not None else reason)[:500],
            "kind": kind.value,
            "delay_seconds": None,
        }],
        queue=delivery_info.get("routing_key") or "",
        worker=hostname,
    )
    outcome = park(record)
    logger.error("recovery: parked %s message %s[%s]: %s", kind.value, task_name, task_id, reason)
    return outcome


class RecoveryConsumer(Consumer):
    """Celery's consumer, parking what it would otherwise drop."""

    def on_unknown_task(self, body, message, exc):
        headers = message.headers or {}
        try:
            park_poison(
                task_id=headers.get("id"), task_name=headers.get("task") or "",
                body=message.body, content_type=message.content_type,
                headers=headers, delivery_info=message.delivery_info, exc=exc,
                reason=f"no task named {headers.get('task')!r} is registered on this worker",
                hostname=self.hostname or "",
            )
        except OSError:
            logger.critical("recovery: could not park unknown task; requeueing", exc_info=True)
            message.reject_log_error(logger, self.connection_errors, requeue=True)
            return
        try:
            super().on_unknown_task(body, message, exc)
        except Exception:  # noqa: BLE001 - the letter is safe; the result backend may be down
            logger.exception("recovery: could not record the unknown task's FAILURE result")

    def on_unknown_message(self, body, message):
        if self._park_undecodable(message, None, "message is not a Celery task message"):
            super().on_unknown_message(body, message)

    def on_invalid_task(self, body, message, exc):
        if self._park_undecodable(message, exc, "invalid task message"):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message, exc):
        if self._park_undecodable(message, exc, "message body cannot be decoded"):
            super().on_decode_error(message, exc)

    def _park_undecodable(self, message, exc, reason: str) -> bool:
        """Park the message; if that fails, requeue it (never drop what we could not keep)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        try:
            park_poison(
                task_id=headers.get("id"), task_name=headers.get("task") or "",
                body=message.body, content_type=message.content_type, headers=headers,
                delivery_info=message.delivery_info, exc=exc, reason=reason,
                hostname=self.hostname or "",
            )
        except Exception:  # noqa: BLE001
            logger.critical("recovery: could not park an undecodable message; requeueing",
                            exc_info=True)
            message.reject_log_error(logger, self.connection_errors, requeue=True)
            return False
        return True


class RecoveryRequest(Request):
    """A request that parks instead of looping or dropping."""

    _recovery_parked = False
    _recovery_requeued = False

    def revoked(self) -> bool:
        if self._recovery_parked:
            return True
        if self._exceeded_delivery_cap():
            return True
        return super().revoked()

    def _exceeded_delivery_cap(self) -> bool:
        redelivered = (self.delivery_info or {}).get("redelivered") or \
            self._request_dict.get("redelivered")
        if not redelivered:
            return False
        from django.db import Error as DatabaseError

        from .deliveries import count_redelivery

        try:
            deliveries, last_failure = count_redelivery(self.id)
        except DatabaseError:
            logger.warning("recovery: cannot count deliveries of %s[%s] (database down); running it",
                           self.name, self.id)
            return False
        cap = int(conf.get("MAX_DELIVERIES"))
        if deliveries <= cap:
            return False
        timed_out = last_failure.startswith("hard time limit")
        reason = (f"delivered {deliveries} times (cap {cap}); last loss: "
                  f"{last_failure or 'the worker holding it died'}")
        try:
            park_poison(
                task_id=self.id, task_name=self.name, body=self._body,
                content_type=self._content_type, headers=self._request_dict,
                delivery_info=self.delivery_info,
                exc=TimeLimitExceeded(last_failure) if timed_out else WorkerLostError(reason),
                reason=reason, kind=FailureKind.TIMEOUT if timed_out else FailureKind.POISON,
                hostname=self.hostname or "",
            )
        except OSError:
            logger.critical("recovery: could not park %s[%s] (database and spool both failed); "
                            "running it once more", self.name, self.id, exc_info=True)
            return False
        self._recovery_parked = True
        task_ready(self)
        try:
            self.task.backend.mark_as_failure(
                self.id, WorkerLostError(reason), request=self._context,
                store_result=self.store_errors,
            )
        except Exception:  # noqa: BLE001
            logger.exception("recovery: could not store FAILURE for %s", self.id)
        self.acknowledge()
        return True

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or not self.task.acks_late:
            return super().on_timeout(soft, timeout)
        self._requeue_after_hard_limit(timeout)

    def _requeue_after_hard_limit(self, timeout: Any) -> None:
        # The child was killed at the hard limit and never got to park itself: count it
        # as a lost delivery and requeue; the delivery cap parks it as a timeout. Celery
        # reports the limit twice (error callback and timeout callback): act once.
        if self._recovery_requeued:
            return
        self._recovery_requeued = True
        self._note_loss(f"hard time limit ({timeout}s) exceeded")
        logger.error("Hard time limit (%ss) exceeded for %s[%s]; requeueing", timeout,
                     self.name, self.id)
        task_ready(self)
        self.reject(requeue=True)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, TimeLimitExceeded) and self.task.acks_late:
            limit = exc.args[0] if exc.args else "?"
            return self._requeue_after_hard_limit(limit)
        if isinstance(exc, WorkerLostError):
            self._note_loss(f"worker lost: {exc}")
        elif not return_ok and not isinstance(
            exc, (Terminated, TimeLimitExceeded, SystemExit, KeyboardInterrupt, MemoryError,
                  Reject, Ignore, Retry)
        ):
            # The pool child raised before the task ran: the body could not be decoded.
            try:
                park_poison(
                    task_id=self.id, task_name=self.name, body=self._body,
                    content_type=self._content_type, headers=self._request_dict,
                    delivery_info=self.delivery_info, exc=exc,
                    reason="message body cannot be decoded", hostname=self.hostname or "",
                )
            except Exception:  # noqa: BLE001
                logger.critical("recovery: could not park undecodable %s; requeueing", self.id,
                                exc_info=True)
                task_ready(self)
                return self.reject(requeue=True)
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)

    def _note_loss(self, description: str) -> None:
        from django.db import Error as DatabaseError

        from .deliveries import note_loss

        try:
            note_loss(self.id, description)
        except DatabaseError:
            logger.warning("recovery: cannot record loss of %s (database down)", self.id)


def __getattr__(name: str) -> Any:
    # Housekeeping lives in recovery.housekeeping, which imports the models: imported on
    # first use, so that recovery.setup() can import this module before Django is set up.
    if name == "Housekeeping":
        from .housekeeping import Housekeeping

        return Housekeeping
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
