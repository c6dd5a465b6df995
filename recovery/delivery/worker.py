"""What must happen in the worker's main process, where the pool child cannot act.

* ``RecoveryConsumer`` turns messages Celery would drop (unknown task name,
  undecodable body, invalid envelope) into ``poison`` dead letters with the raw
  body, and keeps consuming.
* ``RecoveryRequest`` counts redeliveries per task id and parks a task that
  keeps killing its worker (or hitting the hard time limit) instead of running
  it forever; it also parks bodies the pool child could not decode.
* ``Housekeeping`` (a consumer bootstep, in :mod:`recovery.delivery.housekeeping`) extends the
  Redis visibility of every message this worker holds and, on a thread of its own,
  publishes due retries, drains the dead-letter spool, relays the outbox.

``recovery.setup(app)`` installs all three.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import (
    Ignore,
    InvalidTaskError,
    Reject,
    Retry,
    Terminated,
    TimeLimitExceeded,
)
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from celery.worker import state as worker_state
from celery.worker.state import task_ready
from kombu.serialization import loads, prepare_accept_content

from django.db import Error as DatabaseError

from .. import conf, events
from ..core import envelope, redaction
from ..core.brokers import delivered_queue
from ..core.envelope import EnvelopeError
from ..core.errors import exception_path
from ..core.kinds import FailureKind
from ..store import result_rows
from ..store.deliveries import count_redelivery, note_loss
from ..store.models import DeadLetter
from ..store.parking import ParkRecord, park
from ..workflows import rehearsals
from . import handback
from .handback import unstarted_requests
from .housekeeping import Housekeeping
from ..core.names import logger_for

__all__ = ["RecoveryConsumer", "RecoveryRequest", "Housekeeping", "park_poison",
           "parked_already"]

logger = logger_for(__name__)


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


def _size_of(body: Any) -> int:
    """The size of an encoded body, without copying it."""
    if isinstance(body, (bytes, bytearray, str)):
        return len(body)
    if isinstance(body, memoryview):
        return body.nbytes
    return 0


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


def _received_before(message: Any) -> bool:
    """Whether SQS handed this message out before: SQS never rewrites a message, so its
    ``redelivered`` mark stays what the publisher wrote, and its own receive count says
    whether a worker lost it (or gave it back) already."""
    sqs_message = (getattr(message, "delivery_info", None) or {}).get("sqs_message")
    if not isinstance(sqs_message, dict):
        return False
    count = (sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount")
    try:
        return int(count) > 1
    except (TypeError, ValueError):
        return False


def park_poison(*, task_id: str | None, task_name: str, body: Any, content_type: str,
                headers: dict | None, delivery_info: dict | None, exc: BaseException | None,
                reason: str, kind: FailureKind = FailureKind.POISON, hostname: str = "",
                attempt: int = 1, history_extra: dict | None = None,
                keep_existing: bool = False) -> Any:
    """Park a message that cannot run as a dead letter keeping its raw body.
    ``history_extra`` adds to the attempt's history entry what only the caller knows
    (the broker's own account of why it gave the message up); ``keep_existing`` leaves a
    letter the task has already alone but for that entry (:class:`ParkRecord`)."""
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
            "attempt": attempt,
            "replay": 0,
            "exception_type": exception_path(exc) if exc is not None else "",
            "exception_message": (str(exc) if exc is not None else reason)[:500],
            "kind": kind.value,
            "delay_seconds": None,
            **(history_extra or {}),
        }],
        queue=delivered_queue(delivery_info),
        worker=hostname,
        keep_existing=keep_existing,
        # A child a rehearsal killed never got to tag its run; its injection says.
        rehearsal=rehearsals.injected_into(task_id) if rehearsals.enabled() else "",
    )
    outcome = park(record)
    logger.error("recovery: parked %s message %s[%s]: %s", kind.value, task_name, task_id, reason)
    return outcome


def parked_already(task_id: str | None) -> bool:
    """Whether ``task_id`` has a parked letter. A broker's dead-letter drain (RabbitMQ's
    dead-letter exchange, SQS's redrive) then leaves that letter as it is, since it says
    more than "the broker gave it up" (a task that raised ``Reject`` after recovery parked
    it, say), and drops the broker's copy. False when the database cannot tell: parking
    spools the message then, and the spool's drain merges it into the letter."""
    if not task_id:
        return False
    try:
        return DeadLetter.objects.filter(task_id=str(task_id),
                                         status=DeadLetter.Status.PARKED).exists()
    except DatabaseError:
        return False


def _acknowledge_instead_of_rejecting(message: Any) -> None:
    """The message is parked: what Celery does next (reject it) must end it. A broker with
    a dead-letter exchange (RabbitMQ: recovery.delivery.topology) routes a rejected
    message there, and the drain would park it a second time, as "rejected", over the
    letter that says what was wrong with it: acknowledge it instead."""
    reject_log_error = message.reject_log_error

    def acknowledge_log_error(logger: Any, errors: Any, requeue: bool = False) -> Any:
        if requeue:
            return reject_log_error(logger, errors, requeue=True)
        return message.ack_log_error(logger, errors)

    message.reject_log_error = acknowledge_log_error


def _tolerant_close(close):
    def close_broken_connection():
        try:
            return close()
        except AttributeError as exc:
            logger.warning("recovery: closing the broken broker connection failed (%r); the "
                           "messages this worker held return after the visibility timeout",
                           exc)
            return None
    return close_broken_connection


class RecoveryConsumer(Consumer):
    """Celery's consumer, parking what it would otherwise drop, and surviving a broker
    restart while it holds messages."""

    #: Ids of the requests received and never started, as the consumer last closed
    #: (recovery.delivery.handback reads them on shutdown).
    recovery_unstarted: set[str] | None = None

    def on_close(self):
        self.recovery_unstarted = unstarted_requests()
        # On a shutdown (not a lost connection) the pool may yet start some of them.
        # (Celery sets should_stop to the exit code: 0 on a warm shutdown.)
        shutting_down = (worker_state.should_stop is not None
                         or worker_state.should_terminate is not None)
        handback.started_after_close = set() if shutting_down else None
        return super().on_close()

    def on_connection_error_after_connected(self, exc):
        # Celery 5.7 first collect()s the broken connection, which detaches its transport,
        # then close()s it; closing the still-attached Redis channel restores the messages
        # this worker held and reads the detached transport's client: an AttributeError
        # that ignore_errors() does not ignore, and the whole worker stops ("Unrecoverable
        # error"). Restoring is best effort there anyway (the broker just went away): the
        # held messages stay in Redis's unacked set and come back after the visibility
        # timeout, so a failed close is logged and the consumer reconnects as usual.
        #
        # The tasks still running hold messages of the old channel: their acks, once the
        # broker is back, go through that channel's transport too. Re-attaching the
        # connection info to it lets them open a fresh client and acknowledge (instead of
        # stopping the worker the same way, and leaving the message to run a second time).
        connection = self.connection
        transport = getattr(connection, "_transport", None)
        conninfo = getattr(transport, "client", None)
        if connection is not None:
            connection.close = _tolerant_close(connection.close)
        try:
            return super().on_connection_error_after_connected(exc)
        finally:
            if transport is not None and conninfo is not None and transport.client is None:
                transport.client = conninfo

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
        _acknowledge_instead_of_rejecting(message)
        try:
            super().on_unknown_task(body, message, exc)
        except Exception:  # noqa: BLE001 - the letter is safe; the result backend may be down
            logger.exception("recovery: could not record the unknown task's FAILURE result")

    def on_unknown_message(self, body, message):
        if self._park_undecodable(message, None, "message is not a Celery task message"):
            _acknowledge_instead_of_rejecting(message)
            super().on_unknown_message(body, message)

    def on_invalid_task(self, body, message, exc):
        if self._park_undecodable(message, exc, f"invalid task message: {exc}"):
            _acknowledge_instead_of_rejecting(message)
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
    #: (deliveries so far, last loss) of a redelivered message, until checked against the cap
    _recovery_count: tuple[int, str] | None = None

    def __init__(self, message, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (TypeError, ValueError) as exc:
            # A body that is not [args, kwargs, embed] cannot become a request. Celery's
            # consumer parks (RecoveryConsumer.on_invalid_task) what it knows as invalid and
            # lets anything else stop the worker: every worker in turn, as the message is
            # redelivered to the next.
            raise InvalidTaskError(f"body is not [args, kwargs, embed]: {exc}") from exc
        refused = envelope.problem(
            task_id=self.id, headers=self._request_dict, body_bytes=_size_of(self._body),
            max_body_bytes=conf.get("MAX_MESSAGE_BYTES"))
        if refused:
            raise EnvelopeError(refused)
        self._mask_reprs()
        # Counted on receipt, once per delivery: Celery asks revoked() on receipt too when
        # the message has `expires`, and a message handed back unused on a clean shutdown
        # takes its delivery back (recovery.delivery.handback) only if it was counted when received.
        if (self.delivery_info or {}).get("redelivered") or self._request_dict.get("redelivered") \
                or _received_before(message):
            self._recovery_count = self._count_delivery()

    def _mask_reprs(self) -> None:
        """Mask the secrets of Celery's ``argsrepr``/``kwargsrepr`` before anything reads
        them: the received log line and event, and the result row (``result_extended``),
        which a message published by a plain ``send_task`` would show in clear."""
        reprs = result_rows.masked_reprs(self._type, self._args, self._kwargs, self._app,
                                         redaction.saga_secret_keys(self._request_dict))
        if reprs is not None:
            self._argsrepr, self._kwargsrepr = reprs
            self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = reprs

    def revoked(self) -> bool:
        if self._recovery_parked:
            return True
        if self._recovery_count is not None and self._exceeded_delivery_cap():
            return True
        return super().revoked()

    def _count_delivery(self) -> tuple[int, str] | None:
        try:
            return count_redelivery(self.id)
        except DatabaseError:
            logger.warning("recovery: cannot count deliveries of %s[%s] (database down); running it",
                           self.name, self.id)
            return None

    def _exceeded_delivery_cap(self) -> bool:
        """Park the task if its deliveries passed the cap. Checked once per delivery."""
        (deliveries, last_failure), self._recovery_count = self._recovery_count, None
        cap = int(conf.get("MAX_DELIVERIES"))
        if deliveries <= cap:
            return False
        timed_out = last_failure.startswith("hard time limit")
        reason = (f"delivered {deliveries} times (cap {cap}); last loss: "
                  f"{last_failure or 'the worker holding it died'}")
        try:
            park_poison(
                task_id=self.id, task_name=self.name, body=self._body,
                content_type=self._content_type, headers=self._replay_options(),
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

    def _replay_options(self) -> dict:
        """What a replay republishes with (the letter's ``headers``), as RecoveryTask parks
        it; the raw request would hand the replay its own args twice."""
        options = getattr(self.task, "_replay_options", None)
        return options(self._context, self.task.app.amqp.queues) if options is not None else {}

    def on_accepted(self, pid, time_accepted):
        handback.note_started(self.id)
        return super().on_accepted(pid, time_accepted)

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
            if not self._body_undecodable():
                return self._on_internal_error(exc_info, exc)
            # The pool child could not decode the body: the task never ran.
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

    def _body_undecodable(self) -> bool:
        """Whether the pool child failed to decode this body, judged by decoding it here
        the way ``celery.app.trace.fast_trace_task`` does (same serializer, same accept
        list, same ``(args, kwargs, embed)`` shape). Any other error that escapes the
        child is not the body's fault and must not be called "cannot be decoded"."""
        try:
            if self._content_type:
                decoded = loads(self._body, self._content_type, self._content_encoding,
                                accept=prepare_accept_content(self._app.conf.accept_content))
            else:
                decoded = self._body
            args, kwargs, embed = decoded
            kwargs.items  # noqa: B018 - the tracer's own mapping check
            dict(embed or {})
            return False
        except Exception:  # noqa: BLE001 - whatever fails here failed in the child too
            return True

    def _on_internal_error(self, exc_info, exc: BaseException) -> Any:
        """An error outside the task's body that is not a decoding failure: our bookkeeping
        (a result store) or the pool (a return value that could not be sent back). The body
        may well have run, so it is neither parked (an operator would replay finished work)
        nor recorded as the task's FAILURE; the message is acknowledged as Celery does for
        a failure, and the error is logged and counted."""
        logger.error("recovery: %s[%s] hit an internal error outside its body (%s: %s); the "
                     "body may have run, so it is neither parked nor marked failed",
                     self.name, self.id, type(exc).__name__, exc)
        events.internal_error.send(task_name=self.name, error_type=type(exc).__name__)
        return super().on_failure(exc_info, send_failed_event=False, return_ok=True)

    def _note_loss(self, description: str) -> None:
        try:
            note_loss(self.id, description)
        except DatabaseError:
            logger.warning("recovery: cannot record loss of %s (database down)", self.id)
