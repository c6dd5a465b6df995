import pytest


@pytest.fixture(autouse=True)
def _isolated_spool(settings, tmp_path):
    """Each test gets its own dead-letter spool directory."""
    settings.RECOVERY = {**settings.RECOVERY, "SPOOL_DIR": str(tmp_path / "spool")}
