"""The Celery app the benchmark's workers run: plain Celery, or with recovery.setup().

``BENCH_RECOVERY=1`` installs celery-recovery (consumer, housekeeping timers);
``0`` is stock Celery. Both reuse database connections and use the same pool,
concurrency and prefetch, so a ratio measures only what recovery adds.
"""

import os

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

IMMEDIATE = RetryPolicy(max_attempts=3, initial_delay_seconds=0, max_delay_seconds=0, jitter="none")


@app.task(base=Task, bind=True, name="bench.noop_plain")
def noop_plain(self, i):
    return i


@app.task(base=RecoveryTask, bind=True, name="bench.noop_recovery", retry_policy=IMMEDIATE)
def noop_recovery(self, i):
    return i


@app.task(base=Task, bind=True, name="bench.retry_plain", autoretry_for=(ValueError,),
          retry_kwargs={"countdown": 0}, max_retries=3)
def retry_plain(self, i):
    if self.request.retries == 0:
        raise ValueError(f"first run of {i} fails")
    return i


@app.task(base=RecoveryTask, bind=True, name="bench.retry_recovery", retry_policy=IMMEDIATE)
def retry_recovery(self, i):
    if self.request.retries == 0:
        raise ValueError(f"first run of {i} fails")
    return i


@app.task(base=Task, bind=True, name="bench.fail_plain")
def fail_plain(self, i):
    raise PermanentError(f"order {i} cannot be processed")


@app.task(base=RecoveryTask, bind=True, name="bench.fail_recovery", retry_policy=IMMEDIATE)
def fail_recovery(self, i):
    raise PermanentError(f"order {i} cannot be processed")
