"""The rehearsals admin: starting one from a form behind its own permission, its page with the
report, Stop and Purge (POST only, permission checked on every request), the dashboard's
banner while one runs."""

from __future__ import annotations

import pytest
from celery import shared_task
from django.urls import reverse

from recovery import RecoveryTask
from recovery.models import DeadLetter, Rehearsal, RehearsalEvent
from recovery.store.parking import ParkRecord, park
from recovery.workflows import rehearsals

from .test_dashboard import operator

pytestmark = pytest.mark.django_db(transaction=True)


@shared_task(base=RecoveryTask, bind=True, name="tests.rehearsals_admin.charge")
def charge(self, amount: int) -> int:
    return amount


@pytest.fixture(autouse=True)
def enabled(settings):
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": True,
                         "SHARED_STATE_URL": "database"}
    rehearsals._cache.clear()
    yield
    rehearsals.stop(None, actor="test")


ADD = "admin:recovery_rehearsal_add"
FORM = {"task": "tests.rehearsals_admin.charge", "fault": "permanent", "rate": "0.5",
        "duration": "10m", "kind": "dependency", "message": "gateway down"}


def started() -> Rehearsal:
    return rehearsals.start(task="tests.rehearsals_admin.charge", fault="permanent", rate=1.0,
                            duration=rehearsals.parse_duration("5m"), actor="cli:someone")


def test_an_operator_with_the_permission_starts_a_rehearsal_from_the_form(client):
    operator(client, "run_rehearsal")
    response = client.post(reverse(ADD), FORM)
    rehearsal = Rehearsal.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("admin:recovery_rehearsal_change", args=[rehearsal.pk])
    assert (rehearsal.fault, rehearsal.rate, rehearsal.message) == ("permanent", 0.5, "gateway down")
    assert rehearsal.started_by == "admin:oncall"
    assert RehearsalEvent.objects.get().action == "started"
    assert [r.id for r in rehearsals.active()] == [rehearsal.pk]


@pytest.mark.parametrize("change, message", [
    ({"duration": "25h"}, "24 hours at most"),
    ({"duration": "soon"}, "not a duration"),
    ({"rate": "0"}, "rate must be in (0, 1]"),
    ({"task": "tests.rehearsals_admin.chrage"}, "matches no registered task"),
])
def test_a_bad_form_is_shown_again_with_the_reason_and_starts_nothing(client, change, message):
    operator(client, "run_rehearsal")
    response = client.post(reverse(ADD), {**FORM, **change})
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Rehearsal.objects.exists()


def test_without_the_permission_nothing_starts_stops_or_purges(client):
    rehearsal = started()
    operator(client, "view_rehearsal")
    assert client.get(reverse(ADD)).status_code == 403
    assert client.post(reverse(ADD), FORM).status_code == 403
    page = client.get(reverse("admin:recovery_rehearsal_change", args=[rehearsal.pk]))
    assert page.status_code == 200
    assert "Stop this rehearsal" not in page.content.decode()
    assert "rehearsal-report-text" in page.content.decode()  # the report is for viewers too
    assert client.post(reverse("admin:recovery_rehearsal_stop", args=[rehearsal.pk])).status_code == 403
    assert client.post(reverse("admin:recovery_rehearsal_purge", args=[rehearsal.pk]),
                       {"confirm": "yes"}).status_code == 403
    assert Rehearsal.objects.get().is_running()


def test_with_rehearsals_disabled_the_form_is_refused(client, settings):
    settings.RECOVERY = {**settings.RECOVERY, "REHEARSALS_ENABLED": False}
    operator(client, "run_rehearsal")
    assert client.post(reverse(ADD), FORM).status_code == 403
    assert not Rehearsal.objects.exists()


def test_stop_then_purge_from_the_page_post_only_and_purge_asks_for_confirmation(client):
    rehearsal = started()
    operator(client, "run_rehearsal")
    stop = reverse("admin:recovery_rehearsal_stop", args=[rehearsal.pk])
    purge = reverse("admin:recovery_rehearsal_purge", args=[rehearsal.pk])
    assert client.get(stop).status_code == 405
    page = client.get(reverse("admin:recovery_rehearsal_change", args=[rehearsal.pk]))
    assert "Stop this rehearsal" in page.content.decode()
    response = client.post(stop, follow=True)
    assert "Rehearsal %d stopped." % rehearsal.pk in response.content.decode()
    assert not Rehearsal.objects.get().is_running()
    assert Rehearsal.objects.get().stopped_by == "admin:oncall"

    park(ParkRecord(task_id="rh-x", task_name="tests.rehearsals_admin.charge", kind="dependency",
                    reason="r", rehearsal=str(rehearsal.pk)))
    response = client.post(purge, follow=True)
    assert "Tick the box" in response.content.decode()
    assert DeadLetter.objects.exists()
    response = client.post(purge, {"confirm": "yes"}, follow=True)
    assert "deleted 1 letters and 0 incidents" in response.content.decode()
    assert not DeadLetter.objects.exists()
    assert client.post(reverse("admin:recovery_rehearsal_stop", args=[999999])).status_code == 404


def test_the_dashboard_shows_a_banner_while_a_rehearsal_runs(client):
    operator(client, "view_deadletter")
    dashboard = reverse("admin:recovery_dashboard")
    assert "rehearsal-banner" not in client.get(dashboard).content.decode()
    rehearsal = started()
    page = client.get(dashboard).content.decode()
    assert f'id="rehearsal-banner-{rehearsal.pk}"' in page
    assert f"rehearsal={rehearsal.pk}" in page
    rehearsals.stop([rehearsal.pk], actor="test")
    assert "rehearsal-banner" not in client.get(dashboard).content.decode()


def test_a_rehearsals_letters_are_listed_from_its_tag(client):
    rehearsal = started()
    park(ParkRecord(task_id="rh-y", task_name="tests.rehearsals_admin.charge", kind="dependency",
                    reason="r", rehearsal=str(rehearsal.pk)))
    park(ParkRecord(task_id="real", task_name="tests.rehearsals_admin.charge", kind="dependency",
                    reason="r"))
    operator(client, "view_deadletter")
    page = client.get(reverse("admin:recovery_deadletter_changelist") + f"?rehearsal={rehearsal.pk}")
    assert page.status_code == 200
    assert page.context["cl"].result_count == 1
