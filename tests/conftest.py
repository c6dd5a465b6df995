import pytest
import redis
from django.conf import settings


@pytest.fixture(scope="session", autouse=True)
def _sqs_server():
    """moto's SQS server when the suite runs on TEST_BROKER_URL=sqs://moto (tests/settings.py
    chose its port), for the test process and the workers; nothing on other brokers."""
    import os

    url = os.environ.get("TEST_MOTO_URL")
    if not url:
        yield None
        return
    from tests.brokers import moto_server

    with moto_server(url):
        yield url


@pytest.fixture(scope="session")
def sqs_url(_sqs_server):
    """An SQS-API server for tests of recovery's SQS side on any broker: the session's
    moto server on SQS, one of its own otherwise."""
    if _sqs_server:
        yield _sqs_server
        return
    from tests.brokers import free_sqs_url, moto_server

    with moto_server(free_sqs_url()) as url:
        yield url


@pytest.fixture(autouse=True)
def _isolated_spool(settings, tmp_path):
    """Each test gets its own dead-letter spool directory."""
    settings.RECOVERY = {**settings.RECOVERY, "SPOOL_DIR": str(tmp_path / "spool")}


@pytest.fixture
def broker():
    """The test Redis (the broker, or beside RabbitMQ the store of test bookkeeping and
    shared state), empty before and after the test; on RabbitMQ the test vhost's queues
    are emptied too (tests/brokers.py)."""
    from tests.brokers import empty_broker

    client = redis.Redis.from_url(settings.TEST_STORE_URL)
    client.flushdb()
    empty_broker(settings.CELERY_BROKER_URL)
    yield client
    client.flushdb()
    empty_broker(settings.CELERY_BROKER_URL)


@pytest.fixture
def receiver():
    """A real webhook endpoint on localhost (tests.integration.harness.WebhookReceiver)."""
    from tests.integration.harness import WebhookReceiver

    server = WebhookReceiver()
    yield server
    server.close()


@pytest.fixture
def smtp_server():
    """A real SMTP server on localhost (aiosmtpd) that keeps every message it receives."""
    import socket
    from types import SimpleNamespace

    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    received = []

    class Collect(Message):
        def handle_message(self, message):
            received.append(message)

    probe = socket.socket()  # aiosmtpd checks readiness by connecting: it needs a real port
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    controller = Controller(Collect(), hostname="127.0.0.1", port=port)
    controller.start()
    yield SimpleNamespace(port=port, messages=received)
    controller.stop()
