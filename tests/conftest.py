import pytest
import redis
from django.conf import settings


@pytest.fixture(autouse=True)
def _isolated_spool(settings, tmp_path):
    """Each test gets its own dead-letter spool directory."""
    settings.RECOVERY = {**settings.RECOVERY, "SPOOL_DIR": str(tmp_path / "spool")}


@pytest.fixture
def broker():
    """The test Redis (broker and bookkeeping), empty before and after the test."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()
