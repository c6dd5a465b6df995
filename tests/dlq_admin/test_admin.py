"""The read-only dead-letter admin, rendered by Django against real PostgreSQL."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from recovery.models import DeadLetter
from recovery.core.redaction import MASK

pytestmark = pytest.mark.django_db


@pytest.fixture
def letter():
    return DeadLetter.objects.create(
        task_id="t-1", task_name="shop.tasks.charge", args=[42, "EUR"], kwargs={"retry": True},
        headers={"chain": [{"task": "shop.tasks.ship"}]}, kind="dependency", permanent=True,
        reason="permanent failure", exception_type="shop.errors.CardDeclined",
        exception_message="card <declined> for order 42", traceback="Traceback ...",
        attempts=2, history=[
            {"attempt": 1, "at": "2026-11-28T10:00:00+00:00", "kind": "dependency",
             "exception_type": "TimeoutError", "exception_message": "slow", "delay_seconds": 1.5},
            {"attempt": 2, "at": "2026-11-28T10:00:02+00:00", "kind": "dependency",
             "exception_type": "shop.errors.CardDeclined", "exception_message": "declined",
             "delay_seconds": None},
        ], fingerprint="f" * 40, queue="payments",
    )


@pytest.fixture
def viewer(client):
    user = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client.force_login(user)
    return client


def test_change_list_shows_the_letters_columns(viewer, letter):
    response = viewer.get(reverse("admin:recovery_deadletter_changelist"))
    assert response.status_code == 200
    page = response.content.decode()
    for text in ("shop.tasks.charge", "Parked", "External dependency", "shop.errors.CardDeclined"):
        assert text in page


def test_detail_page_pretty_prints_payload_history_and_escapes_text(viewer, letter):
    response = viewer.get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    # shop.tasks.charge cannot be imported here: its positional arguments are all masked
    # (issue 11, item 6), keywords pretty-printed by name.
    assert "EUR" not in page and MASK in page
    assert "&quot;retry&quot;: true" in page
    assert "shop.tasks.ship" in page
    assert "1.50s" in page  # the delay chosen after the first attempt
    assert "card &lt;declined&gt;" in page
    assert "<declined>" not in page


def test_search_by_task_id_and_filter_by_status(viewer, letter):
    url = reverse("admin:recovery_deadletter_changelist")
    row_link = reverse("admin:recovery_deadletter_change", args=[letter.pk])
    assert row_link in viewer.get(url, {"q": "t-1"}).content.decode()
    assert row_link not in viewer.get(url, {"q": "t-2"}).content.decode()
    assert row_link in viewer.get(url, {"status__exact": "parked"}).content.decode()
    assert row_link not in viewer.get(url, {"status__exact": "resolved"}).content.decode()


def test_letters_cannot_be_added_changed_or_deleted_from_the_admin(admin_client, letter):
    assert admin_client.get(reverse("admin:recovery_deadletter_add")).status_code == 403
    assert admin_client.post(reverse("admin:recovery_deadletter_delete", args=[letter.pk]),
                             {"post": "yes"}).status_code == 403
    admin_client.post(reverse("admin:recovery_deadletter_change", args=[letter.pk]),
                      {"task_name": "changed"})
    letter.refresh_from_db()
    assert letter.task_name == "shop.tasks.charge"


def test_staff_without_the_view_permission_is_refused(client, letter):
    user = get_user_model().objects.create_user("nobody", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(reverse("admin:recovery_deadletter_changelist")).status_code == 403
