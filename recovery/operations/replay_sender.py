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
``shadow_name`` (it may route, stamp or refuse on its own), one with an ``expires``, a
pydantic-typed one, an app that runs tasks eagerly or sends ``task-sent`` events, a
replay started from inside a running task (Celery links it to its parent) all keep
``apply_async``: detected per task, never assumed.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.app.task import Task as CeleryTask
from kombu import Queue

from ..core import redaction
from ..store import result_rows

__all__ = ["ReplaySender"]

MASKED_PUBLISH = result_rows.MASKED_PUBLISH


class ReplaySender:
    """Publishes one batch's replays on ``producer``; :meth:`send` takes a replay's
    signature (task, args, kwargs, queue and priority, from the letter's allow-list)."""

    def __init__(self, app: Celery, producer: Any) -> None:
        app = getattr(app, "_get_current_object", lambda: app)()  # ``current_app`` is a proxy
        self.app = app
        self.producer = producer
        self._plans: dict[str, _Plan | None] = {}
        self._declared: set[str] = set()
        conf = app.conf
        self._app_allows = (not conf.task_always_eager and not conf.task_send_sent_event
                            and getattr(type(app), "send_task", None) is Celery.send_task
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

    def _declare_option(self, queue: Any) -> dict:
        """``declare=[]`` once this batch's producer has declared the routed ``queue``:
        kombu would declare it again for every message (cached, but ~30 µs of lookups)."""
        name = queue.name if isinstance(queue, Queue) else queue
        if not isinstance(name, str) or not name:
            return {}
        if name in self._declared:
            return {"declare": []}
        self._declared.add(name)
        return {}


def _publishes_as_celery(task: Any) -> bool:
    cls = type(task)
    apply_async = cls.apply_async
    return ((apply_async is CeleryTask.apply_async or getattr(apply_async, MASKED_PUBLISH, False))
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
        options.update(sender._declare_option(options.get("queue")))
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
