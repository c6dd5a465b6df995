"""Attackers for the security suite: staff users holding only the permissions named."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission


@pytest.fixture
def staff_client(client):
    """``staff_client("discard_deadletter")``: the test client logged in as a staff user
    with ``view_deadletter`` and the codenames given, nothing else."""

    def login(*codenames: str):
        user = get_user_model().objects.create_user(
            f"op-{'-'.join(codenames) or 'viewer'}", password="pw", is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(
            codename__in=("view_deadletter", *codenames)))
        client.force_login(user)
        return client

    return login


# Real worker processes for the attacks that happen in a worker (tests/integration's own).
from tests.integration.conftest import key, start_worker, store, worker_env  # noqa: E402,F401
