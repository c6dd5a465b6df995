"""The attackers of the admin tests: staff users holding only the permissions named
(a fixture module of its own, so the parts of issue 11 do not collide on conftest.py)."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission


@pytest.fixture
def staff(client):
    """``staff("view_deadletter", ...)``: the test client logged in as a staff user with
    exactly those ``recovery`` permissions."""
    made = []

    def login(*codenames: str):
        user = get_user_model().objects.create_user(f"staff{len(made)}", password="pw",
                                                    is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(
            content_type__app_label="recovery", codename__in=codenames))
        made.append(user)
        client.force_login(user)
        return client

    return login
