"""The Celery app the benchmark's workers run: plain Celery, or with recovery.setup().

``BENCH_RECOVERY=1`` installs celery-recovery (consumer, housekeeping timers);
``0`` is stock Celery. Both reuse database connections and use the same pool,
concurrency and prefetch, so a ratio measures only what recovery adds.
"""

import hashlib
import os
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off

import django  # noqa: E402
from celery import Celery, Task  # noqa: E402

django.setup()

from recovery import PermanentError, RecoveryTask, RetryPolicy  # noqa: E402
import recovery  # noqa: E402

app = Celery("bench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(task_default_queue="bench", worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", 4)),
                CELERY_DB_REUSE_MAX=2**31)
if os.environ.get("BENCH_RECOVERY") == "1":
    recovery.setup(app)
else:
    # On RabbitMQ the same quorum queue the recovery side declares (and RabbitMQ refuses
    # to redeclare it otherwise), so the ratio measures only the runtime recovery adds,
    # never the queue type. Redis keeps stock Celery's settings.
    from recovery.core.brokers import AMQP, SQS, broker_kind
    from recovery.delivery import topology

    if broker_kind(app.conf.broker_url) == AMQP:
        topology.apply(app.conf)
    elif broker_kind(app.conf.broker_url) == SQS:
        # kombu's own SQS transport, with what it needs to reach a local server at all
        # (plain HTTP, a region) and the same polling as the recovery side.
        app.conf.broker_transport_options = topology.sqs_transport_options(app.conf.broker_url)
    from django.db import close_old_connections
    from celery import signals

    # Stock Celery with the same connection reuse recovery.setup() installs.
    signals.task_prerun.connect(lambda **kw: close_old_connections(), weak=False)

#: A file the first run of task number START_INDEX creates, holding the time it started:
#: the measured window opens there (bench/throughput.py), when every pool child has run a
#: few tasks (its first opens the database connection and fills recovery's caches), on
#: both sides alike. Tasks are queued in order, so taken in order.
START_MARK = os.environ.get("BENCH_START_MARK", "")
START_INDEX = int(os.environ.get("BENCH_START_INDEX", 0))


def mark_start(i) -> None:
    if i == START_INDEX and START_MARK:
        try:
            fd = os.open(START_MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # a retry of that task
            return
        os.write(fd, repr(time.time()).encode())
        os.close(fd)


IMMEDIATE = RetryPolicy(max_attempts=3, initial_delay_seconds=0, max_delay_seconds=0, jitter="none")


@app.task(base=Task, bind=True, name="bench.noop_plain")
def noop_plain(self, i):
    mark_start(i)
    return i


@app.task(base=RecoveryTask, bind=True, name="bench.noop_recovery", retry_policy=IMMEDIATE)
def noop_recovery(self, i):
    mark_start(i)
    return i


@app.task(base=Task, bind=True, name="bench.retry_plain", autoretry_for=(ValueError,),
          retry_kwargs={"countdown": 0}, max_retries=3)
def retry_plain(self, i):
    mark_start(i)
    if self.request.retries == 0:
        raise ValueError(f"first run of {i} fails")
    return i


@app.task(base=RecoveryTask, bind=True, name="bench.retry_recovery", retry_policy=IMMEDIATE)
def retry_recovery(self, i):
    mark_start(i)
    if self.request.retries == 0:
        raise ValueError(f"first run of {i} fails")
    return i


@app.task(base=Task, bind=True, name="bench.fail_plain")
def fail_plain(self, i):
    mark_start(i)
    raise PermanentError(f"order {i} cannot be processed")


@app.task(base=RecoveryTask, bind=True, name="bench.fail_recovery", retry_policy=IMMEDIATE)
def fail_recovery(self, i):
    mark_start(i)
    raise PermanentError(f"order {i} cannot be processed")


class HandWrittenDeadLetterTask(Task):
    """The like-for-like baseline of parking: stock Celery plus what a team would write
    by hand to keep a failed task, an ``on_failure`` that saves it to the same dead-letter
    table (payload, exception, traceback, queue, worker), beside Celery's FAILURE row."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        from recovery.models import DeadLetter

        request = self.request
        exception_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        DeadLetter.objects.create(
            task_id=task_id, task_name=self.name, args=list(args), kwargs=dict(kwargs),
            headers={"root_id": request.root_id, "priority": request.delivery_info.get("priority")},
            exception_type=exception_type, exception_message=str(exc)[:2000],
            traceback=einfo.traceback, queue=request.delivery_info.get("routing_key") or "",
            worker=request.hostname or "", attempts=request.retries + 1,
            fingerprint=hashlib.sha1(f"{self.name}:{exception_type}".encode()).hexdigest(),
        )


@app.task(base=HandWrittenDeadLetterTask, bind=True, name="bench.fail_plain_dead_letter")
def fail_plain_dead_letter(self, i):
    mark_start(i)
    raise PermanentError(f"order {i} cannot be processed")
