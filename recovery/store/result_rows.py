"""Result rows hold no secret in clear: masked argument reprs, scrubbed failures.

With ``result_extended``, django-celery-results stores a task's ``argsrepr`` and
``kwargsrepr`` as the row's ``task_args``/``task_kwargs`` (its admin shows and searches
them), and a FAILURE row keeps the exception text and the traceback. Celery documents
``argsrepr``/``kwargsrepr`` as the way to hide sensitive arguments; they also reach worker
logs and events. So recovery sets them masked, by the rules of dead letters
(:mod:`recovery.core.redaction`, positional arguments bound to the task's signature):

- when a RecoveryTask is published (``apply_async``), for the publisher's events;
- when a worker receives the message (``RecoveryRequest``), since a plain ``send_task``
  publishes Celery's clear repr: every row, log line and event of the worker then shows
  the masked one;
- and the values masking hid are scrubbed from the FAILURE (and RETRY) result and
  traceback before they are stored, on the fast and the general park path alike.

The dead letter keeps the real payload: a replay needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery.utils.saferepr import saferepr

from ..core import bounds, headers as hdr, redaction
from .. import conf
from ..core.names import logger_for

__all__ = ["masked_reprs", "masked_publish", "MASKED_PUBLISH", "hidden_in_request",
           "scrubbed_failure"]

logger = logger_for(__name__)

#: Celery's own bound on ``argsrepr``/``kwargsrepr`` (``celery.app.amqp.AMQP``).
REPR_MAX_CHARS = 1024


#: Set on a task class's ``apply_async`` that is Celery's own plus :func:`masked_reprs`
#: and nothing else: a bulk replay may then build the message itself
#: (:mod:`recovery.operations.replay_sender`). A subclass that overrides it loses the mark.
MASKED_PUBLISH = "recovery_masked_publish"


def masked_publish(apply_async: Any) -> Any:
    """Mark ``apply_async`` as :data:`MASKED_PUBLISH` says."""
    setattr(apply_async, MASKED_PUBLISH, True)
    return apply_async


#: What stands for arguments that could not be masked (never their clear repr).
UNMASKABLE = f"({redaction.MASK})"


def masked_reprs(task_name: str, args: Any, kwargs: Any, app: Any = None,
                 extra_keys: Any = ()) -> tuple[str, str] | None:
    """``(argsrepr, kwargsrepr)`` with secrets masked (``extra_keys``: a saga's own, see
    :func:`recovery.core.redaction.saga_secret_keys`); None when nothing is secret.

    None lets Celery's own repr stand, so a task without secrets costs no new repr.
    Arguments that masking fails on are hidden whole: this runs as a message is
    published or received, which it must never stop.
    """
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, (Mapping, type(None))):
        return None
    raw_args, raw_kwargs = list(args), dict(kwargs or {})
    try:
        shown_args, shown_kwargs = redaction.masked_payload(task_name, raw_args, raw_kwargs, app,
                                                            extra_keys=extra_keys)
    except Exception:  # noqa: BLE001 - fail closed, never stop the message
        logger.warning("recovery: cannot mask the arguments of %s; hiding them", task_name,
                       exc_info=True)
        return UNMASKABLE, UNMASKABLE
    if shown_args == raw_args and shown_kwargs == raw_kwargs:
        return None
    shown = tuple(shown_args) if isinstance(args, tuple) else shown_args
    return saferepr(shown, REPR_MAX_CHARS), saferepr(shown_kwargs, REPR_MAX_CHARS)


def saga_keys(request: Any) -> tuple[str, ...]:
    """The secret keys a saga step's request carries in its ``recovery_saga`` header."""
    return redaction.saga_secret_keys({hdr.SAGA: hdr.read(request, hdr.SAGA)})


def hidden_in_request(request: Any, app: Any = None) -> list | None:
    """The secret values of the task call ``request`` describes (see
    :func:`recovery.core.redaction.hidden_values`): empty without a request or secrets, None
    when masking fails on the arguments (then :func:`scrubbed_failure` hides the text
    whole: fail closed)."""
    task_name = getattr(request, "task", None) or getattr(request, "name", None)
    args, kwargs = getattr(request, "args", None), getattr(request, "kwargs", None)
    if not task_name or not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping):
        return []
    raw = [list(args), dict(kwargs)]
    try:
        masked = list(redaction.masked_payload(str(task_name), raw[0], raw[1], app,
                                               extra_keys=saga_keys(request)))
        return redaction.hidden_values(raw, masked)
    except Exception:  # noqa: BLE001 - never stop the result store; hide the text instead
        logger.warning("recovery: cannot mask the arguments of %s; hiding its failure text",
                       task_name, exc_info=True)
        return None


def scrubbed_failure(backend: Any, exc: Any, traceback: str | None,
                     values: list | None) -> tuple[Any, str | None]:
    """The exception (ready for ``backend.store_result``) and traceback to store, with
    ``values`` scrubbed from their text; unchanged when ``values`` is empty, hidden whole
    when it is None (see :func:`hidden_in_request`).

    The exception becomes the backend's JSON form (type, message, module), which
    ``store_result`` stores as it is; a backend that pickles exceptions keeps the object.
    """
    message_max, traceback_max = int(conf.get("MESSAGE_MAX_CHARS")), int(conf.get("TRACEBACK_MAX_CHARS"))
    too_long = len(traceback or "") > traceback_max or len(str(exc)) > message_max
    if values is not None and not values and not too_long:
        return exc, traceback
    prepared = backend.prepare_exception(exc) if isinstance(exc, BaseException) else exc
    if values is None:
        if isinstance(prepared, Mapping):
            prepared = {**prepared, "exc_message": [redaction.MASK]}
        return prepared, (redaction.MASK if traceback else traceback)
    if isinstance(prepared, Mapping):
        prepared = redaction.scrub_strings(dict(prepared), values)
        # The row is bounded like a letter (recovery.core.bounds): a 1 MB message is input too.
        message = prepared.get("exc_message")
        if isinstance(message, (list, tuple)):
            prepared["exc_message"] = [bounds.cut(item, message_max) if isinstance(item, str)
                                       else item for item in message]
    shown_traceback = redaction.scrub_text(traceback, values) if traceback else traceback
    return prepared, (bounds.cut(shown_traceback, traceback_max) if shown_traceback
                      else shown_traceback)
