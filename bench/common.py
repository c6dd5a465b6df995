"""What the benchmarks share."""

from __future__ import annotations


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of ``url`` if it does not exist (benchmarks own theirs)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def fresh_queue(app, broker_url: str, task_name: str, n: int, tables: tuple[str, ...]) -> None:
    """Truncate ``tables``, empty the broker's ``bench`` queue and queue ``n`` calls of
    ``task_name`` (argument: the call's index), so a worker started next drains exactly them."""
    from django.db import connection

    with connection.cursor() as cursor:  # TRUNCATE: no dead tuples left to slow the next run
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
    empty_broker(broker_url, ("bench",))
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(task_name, args=(i,), producer=producer)
    connection.close()


def empty_broker(url: str, queues: tuple[str, ...]) -> None:
    """Leave nothing queued from an earlier run: flush the Redis database, or purge the
    named queues on RabbitMQ or SQS (a queue not declared yet is fine)."""
    from recovery.core.brokers import AMQP, REDIS, SQS, broker_kind

    kind = broker_kind(url)
    if kind == REDIS:
        import redis

        redis.Redis.from_url(url).flushdb()
    elif kind in (AMQP, SQS):
        from kombu import Connection

        with Connection(url, connect_timeout=5) as connection:
            for name in queues:
                channel = connection.channel()
                try:
                    channel.queue_purge(name)
                except Exception:  # noqa: BLE001 - NOT_FOUND: nothing to purge
                    pass
                finally:
                    try:
                        channel.close()
                    except Exception:  # noqa: BLE001
                        pass
    else:
        raise SystemExit(f"bench: no way to empty a {kind} broker ({url})")
