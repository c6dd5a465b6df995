"""Attack: read a secret argument from the record of a fallback that stood in for a task
(``FallbackUse.exception_message``), as a staff user who may only view fallback uses.

The task's exception quotes its card token; the record is written in the worker, so the
text is scrubbed there, the way a dead letter's is, and search cannot find the token.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from recovery.models import FallbackUse
from recovery.core.redaction import MASK

from ..integration.harness import wait_for
from . import secret_tasks

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TOKEN = "tok_live_FALLBACK_4242"


def test_a_fallback_record_never_quotes_the_secret_the_exception_did(start_worker, client):
    # Given a task whose permanent failure quotes its card token, and whose fallback stands in
    start_worker(extra=("-I", "tests.security.secret_tasks"))
    result = secret_tasks.charge_with_fallback.delay(7, TOKEN)
    assert result.get(timeout=30) == {"order_id": 7, "queued": True}
    use = wait_for(lambda: FallbackUse.objects.filter(task_id=result.id).first(), 15,
                   message="the fallback use to be recorded")
    # Then the record keeps what happened, with the token masked
    assert use.exception_message == f"token {MASK} declined"
    # and a staff user who may only view fallback uses finds and reads nothing of it
    user = get_user_model().objects.create_user("fb-viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_fallbackuse"))
    client.force_login(user)
    listing = client.get(reverse("admin:recovery_fallbackuse_changelist"), {"q": TOKEN})
    assert listing.status_code == 200 and "0 fallback uses" in listing.content.decode()
    page = client.get(reverse("admin:recovery_fallbackuse_change", args=[use.pk]))
    assert page.status_code == 200 and TOKEN not in page.content.decode()
