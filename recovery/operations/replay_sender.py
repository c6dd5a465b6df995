"""A bulk replay's publisher: Celery's own message, without Celery's per-call overhead.

A bulk replay of 100,000 letters spent three quarters of its time in
``signature.apply_async``: per message, a signature, a masking pass, the task's
``apply_async``, ``app.send_task`` (settings read through a chain of mappings, a result
object built and dropped) and a queue declaration the channel had already made. Celery
builds the message itself in ``app.amqp.create_task_message`` and sends it with
``app.amqp.send_task_message``; :class:`ReplaySender` calls those two, as ``send_task``
would, with what ``Task.apply_async`` and ``send_task`` would have worked out, looked
up once per task and batch instead of once per letter. The publish signals, the
router (asked per letter: a router function may route by argument), the result
backend's ``on_task_call``, the task's argument check and the masked ``argsrepr`` of
:class:`~recovery.task.RecoveryTask` are all kept, so the message is the one
``apply_async`` sends (``tests/recovery/test_replay_sender.py`` compares them).

Only where that equivalence is known: a task whose class overrides ``apply_async`` or
``shadow_name`` (it may route, stamp or refuse on its own), an ``apply_async`` wrapped by
an integration (Sentry's Celery integration wraps ``Task.apply_async`` to add its trace
headers) or patched on the task or app, one with an ``expires``, a pydantic-typed one, an
app that runs tasks eagerly or sends ``task-sent`` events, a replay started from inside a
running task (Celery links it to its parent), and any Celery other than the minor
version this copies (:data:`CELERY_VERSION`) all keep ``apply_async``: detected per
task, never assumed.
"""

from __future__ import annotations

from typing import Any

import celery
import celery.app.task as celery_task_module
from celery import Celery, Task
from celery.app.task import Task as CeleryTask
from kombu import Queue

from ..core import redaction
from ..store import result_rows

__all__ = ["ReplaySender"]

MASKED_PUBLISH = result_rows.MASKED_PUBLISH

#: The Celery minor version whose ``Task.apply_async`` and ``send_task`` this follows
#: (5.7.0); on any other the replay keeps ``apply_async`` until the comparison test
#: (tests/recovery/test_replay_sender.py) has passed on it and this is moved.
CELERY_VERSION = (5, 7)

#: Where Celery's own ``Task.apply_async`` is defined (a wrapper an integration installed
#: before this module was imported is defined elsewhere).
_CELERY_TASK_FILE = celery_task_module.__file__


class ReplaySender:
    """Publishes one batch's replays on ``producer``; :meth:`send` takes a replay's
    signature (task, args, kwargs, queue and priority, from the letter's allow-list)."""

    def __init__(self, app: Celery, producer: Any) -> None:
        app = getattr(app, "_get_current_object", lambda: app)()  # ``current_app`` is a proxy
        self.app = app
        self.producer = producer
        self._plans: dict[str, _Plan | None] = {}
        conf = app.conf
        self._app_allows = (tuple(celery.VERSION[:2]) == CELERY_VERSION
                            and not conf.task_always_eager and not conf.task_send_sent_event
                            and getattr(type(app), "send_task", None) is Celery.send_task
                            and "send_task" not in vars(app)
                            and app.current_worker_task is None)

    def send(self, signature: Any, task_id: str, headers: dict) -> None:
        """Publish one replay as ``signature.apply_async(task_id=…, headers=…)`` would."""
        plan = self._plan(signature.task)
        if plan is None:
            signature.apply_async(task_id=task_id, headers=headers, producer=self.producer)
            return
        plan.send(self, tuple(signature.args or ()), dict(signature.kwargs or {}),
                  dict(signature.options), task_id, headers)

    def direct(self, task_name: str) -> bool:
        """Whether replays of ``task_name`` skip ``apply_async`` (for tests and the bench)."""
        return self._plan(task_name) is not None

    def _plan(self, task_name: str) -> _Plan | None:
        if task_name not in self._plans:
            task = self.app.tasks.get(task_name)
            self._plans[task_name] = (_Plan(task) if self._app_allows and task is not None
                                      and _publishes_as_celery(task) else None)
        return self._plans[task_name]

    def declare_option(self, queue: Any) -> dict:
        """``declare=[]`` when kombu's own declaration cache holds the routed ``queue`` on
        this producer's connection, the check kombu's ``maybe_declare`` makes first, minus
        binding a copy of the queue and wrapping the call for retries (~30 µs a message).
        Kombu empties that cache on reconnect and never caches an auto-delete or expiring
        queue, so those are declared again, as ``apply_async`` would."""
        if not isinstance(queue, Queue) or not queue.can_cache_declaration:
            return {}
        connection = getattr(self.producer.channel, "connection", None)
        if connection and hash(queue) in connection.client.declared_entities:
            return {"declare": []}
        return {}


def _is_celerys_apply_async(function: Any) -> bool:
    """Celery's own ``Task.apply_async``, not a wrapper of it (``functools.wraps`` keeps
    the name but not the code) nor a replacement."""
    code = getattr(function, "__code__", None)
    return (code is not None and code.co_filename == _CELERY_TASK_FILE
            and code.co_name == "apply_async" and not hasattr(function, "__wrapped__"))


def _publishes_as_celery(task: Any) -> bool:
    cls = type(task)
    apply_async = cls.apply_async
    own = _is_celerys_apply_async(apply_async)
    masked = (getattr(apply_async, MASKED_PUBLISH, False) and not hasattr(apply_async, "__wrapped__")
              and _is_celerys_apply_async(CeleryTask.apply_async))
    return ((own or masked)
            and "apply_async" not in vars(task)
            and cls.shadow_name is CeleryTask.shadow_name
            and not getattr(task, "__v2_compat__", False)
            and task.expires is None
            and getattr(task, "_dump_pydantic_arguments", None) is None
            and not (task.soft_time_limit and task.time_limit
                     and task.soft_time_limit > task.time_limit))


class _Plan:
    """What ``Task.apply_async`` and ``send_task`` work out for one task, once."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.name = task.name
        self.masks = bool(getattr(type(task).apply_async, MASKED_PUBLISH, False))
        self.check_arguments = getattr(task, "__header__", None) if task.typing else None
        self.exec_options = dict(task._get_exec_options())
        self.ignore_result = task.ignore_result

    def send(self, sender: ReplaySender, args: tuple, kwargs: dict, options: dict,
             task_id: str, headers: dict) -> None:
        app, task = sender.app, self.task
        options["headers"] = headers
        # RecoveryTask.apply_async
        if self.masks and options.get("argsrepr") is None and options.get("kwargsrepr") is None:
            reprs = result_rows.masked_reprs(self.name, args, kwargs, app,
                                             redaction.saga_secret_keys(options))
            if reprs is not None:
                options["argsrepr"], options["kwargsrepr"] = reprs
        # Task.apply_async
        if self.check_arguments is not None:
            self.check_arguments(*args, **kwargs)
        options = dict(self.exec_options, **options)
        options.setdefault("ignore_result", self.ignore_result)
        # Celery.send_task (no countdown, eta, expires, parent, link or chain: a replay has none)
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        options.pop("expires", None)
        ignore_result = options.pop("ignore_result", None)
        options = app.amqp.router.route(options, self.name, args, kwargs, task)
        options.update(sender.declare_option(options.get("queue")))
        message = app.amqp.create_task_message(
            task_id, self.name, args, kwargs, None, None, None, None, None, 0, None, None, None,
            app.thread_oid, time_limit, soft_time_limit, False, None, None, None, None,
            ignore_result=ignore_result, replaced_task_nesting=0, **options)
        for stamp in options.pop("stamped_headers", []):
            options.pop(stamp)
        producer = sender.producer
        with producer.connection._reraise_as_library_errors():
            if not ignore_result:
                app.backend.on_task_call(producer, task_id)
            app.amqp.send_task_message(producer, self.name, message, **options)
        # send_task returns an AsyncResult, which the replay drops: dropping it is what
        # ends a result backend's pending subscription (Redis: on_task_call subscribes).
        result = task.AsyncResult(task_id)
        result.ignored = ignore_result
