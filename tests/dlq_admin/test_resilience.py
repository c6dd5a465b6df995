"""The operator surface for circuits, degraded modes and fallback uses: ``manage.py circuits``,
``manage.py degraded``, the admin page /admin/recovery/sharedstate/ and the read-only
FallbackUse admin. Shared state lives in the test database here (SHARED_STATE_URL
"database"), so every test starts from nothing."""

from __future__ import annotations

import json
import time
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.urls import reverse

from recovery.workflows import degraded
from recovery.workflows.circuit import Circuit
from recovery.models import FallbackUse

pytestmark = pytest.mark.django_db

UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def database_state(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "database"}


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# -- manage.py circuits ----------------------------------------------------------------------------


def test_circuits_lists_configured_and_declared_circuits_with_their_state():
    Circuit("partner-api").trip(seconds=120)
    out = run("circuits")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "partner-api" in lines  # RECOVERY["CIRCUITS"] in the test settings
    assert " open " in lines["partner-api"]
    assert "opens at 50% of >= 4 calls in 30s; open 3s; 1 trial(s)" in lines["partner-api"]
    assert run("circuits", "list") == out


def test_circuits_list_as_json():
    circuit = Circuit("partner-api")
    circuit.record(False)
    circuit.record(True)
    (row,) = [r for r in json.loads(run("circuits", "list", "--json")) if r["name"] == "partner-api"]
    assert row["state"] == "closed"
    assert row["calls_in_window"] == 2 and row["failures_in_window"] == 1


def test_trip_opens_a_circuit_for_the_given_seconds_and_reset_closes_it():
    out = run("circuits", "trip", "partner-api", "--seconds", "120")
    assert "Circuit partner-api is open until" in out
    state = Circuit("partner-api").state()
    assert state["state"] == "open"
    assert state["open_until"] == pytest.approx(time.time() + 120, abs=5)
    assert not Circuit("partner-api").allow().allowed
    assert "is closed" in run("circuits", "reset", "partner-api")
    assert Circuit("partner-api").state()["state"] == "closed"
    assert Circuit("partner-api").allow().allowed


def test_an_unknown_circuit_name_is_refused_with_the_known_ones():
    with pytest.raises(CommandError, match=r"no circuit 'partner-apj'; known circuits: .*partner-api"):
        call_command("circuits", "reset", "partner-apj")
    with pytest.raises(CommandError, match="not a circuit name"):
        call_command("circuits", "trip", "bad name!")


def test_a_circuit_used_only_through_guard_can_be_reset_once_it_has_a_record():
    Circuit("ad-hoc-api").trip()
    run("circuits", "reset", "ad-hoc-api")
    assert Circuit("ad-hoc-api").state()["state"] == "closed"


def test_trip_refuses_a_non_positive_duration():
    with pytest.raises(CommandError, match="--seconds must be positive"):
        call_command("circuits", "trip", "partner-api", "--seconds", "0")
    assert Circuit("partner-api").state()["state"] == "closed"


def test_an_unreachable_store_is_reported_not_hidden(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": UNREACHABLE}
    assert "unknown: ConnectionError" in run("circuits")
    with pytest.raises(CommandError, match="cannot be reached"):
        call_command("circuits", "reset", "partner-api")


# -- manage.py degraded ----------------------------------------------------------------------------


def test_degraded_on_and_off_with_who_and_why():
    assert "Degraded mode read-only is on." in run("degraded", "on", "read-only", "--reason",
                                                   "database failover")
    assert degraded.is_on("read-only")
    entry = degraded.status()["read-only"]
    assert entry["actor"].startswith("cli") and entry["reason"] == "database failover"
    listed = run("degraded")
    assert "read-only" in listed and " on " in listed and "database failover" in listed
    run("degraded", "off", "read-only")
    assert not degraded.is_on("read-only")
    assert " off " in run("degraded", "list")


def test_degraded_on_needs_a_reason_and_a_valid_name():
    with pytest.raises(CommandError, match="--reason"):
        call_command("degraded", "on", "read-only")
    with pytest.raises(CommandError, match="not a mode name"):
        call_command("degraded", "on", "read only", "--reason", "x")
    assert not degraded.is_on("read-only")


def test_degraded_lists_modes_tasks_declare_before_anyone_switched_them():
    # tasks.partners.sales_report declares degraded_mode="read-only"
    out = run("degraded")
    assert "read-only" in out and " off " in out


def test_degraded_with_an_unreachable_store_says_so(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": UNREACHABLE}
    with pytest.raises(CommandError, match="cannot be reached; read-only unchanged"):
        call_command("degraded", "on", "read-only", "--reason", "x")
    with pytest.raises(CommandError, match="cannot be read"):
        call_command("degraded", "list")


# -- the admin page --------------------------------------------------------------------------------


def _staff(client, username: str, *codenames: str):
    user = get_user_model().objects.create_user(username, password="pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client.force_login(user)
    return client


OVERVIEW = "admin:recovery_sharedstate_changelist"


def _circuit_url(name: str, operation: str) -> str:
    return reverse("admin:recovery_sharedstate_circuit", args=[name, operation])


def test_a_viewer_sees_circuits_and_modes_but_no_buttons(client):
    viewer = _staff(client, "viewer", "view_sharedstate")
    Circuit("partner-api").trip(seconds=120)
    degraded.switch("read-only", True, actor="alice", reason="failover")
    response = viewer.get(reverse(OVERVIEW))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="circuits"' in page and "partner-api" in page and "circuit-open" in page
    assert 'id="degraded-modes"' in page and "failover" in page and "alice" in page
    assert "Reset (close)" not in page and "Switch off" not in page


def test_staff_without_the_permission_get_403(client):
    other = _staff(client, "nobody")
    assert other.get(reverse(OVERVIEW)).status_code == 403
    assert other.post(_circuit_url("partner-api", "reset")).status_code == 403
    assert other.post(reverse("admin:recovery_sharedstate_degraded"),
                      {"mode": "read-only", "state": "on", "reason": "x"}).status_code == 403


def test_a_viewer_cannot_reset_trip_or_switch(client):
    viewer = _staff(client, "viewer", "view_sharedstate")
    Circuit("partner-api").trip(seconds=120)
    assert viewer.post(_circuit_url("partner-api", "reset")).status_code == 403
    assert viewer.post(_circuit_url("partner-api", "trip")).status_code == 403
    assert viewer.post(reverse("admin:recovery_sharedstate_degraded"),
                       {"mode": "read-only", "state": "on", "reason": "x"}).status_code == 403
    assert Circuit("partner-api").state()["state"] == "open"
    assert not degraded.is_on("read-only")


def test_an_operator_trips_and_resets_a_circuit(client):
    operator = _staff(client, "operator", "view_sharedstate", "change_sharedstate")
    page = operator.get(reverse(OVERVIEW)).content.decode()
    assert "Reset (close)" in page and "Trip (open)" in page
    response = operator.post(_circuit_url("partner-api", "trip"), {"seconds": "90"}, follow=True)
    assert "Circuit partner-api is open." in response.content.decode()
    state = Circuit("partner-api").state()
    assert state["state"] == "open"
    assert state["open_until"] == pytest.approx(time.time() + 90, abs=5)
    operator.post(_circuit_url("partner-api", "reset"))
    assert Circuit("partner-api").state()["state"] == "closed"


def test_circuit_buttons_are_post_only_and_for_known_circuits(client):
    operator = _staff(client, "operator", "view_sharedstate", "change_sharedstate")
    assert operator.get(_circuit_url("partner-api", "reset")).status_code == 405
    assert operator.post(_circuit_url("no-such-api", "reset")).status_code == 404
    assert operator.post(_circuit_url("partner-api", "explode")).status_code == 404
    response = operator.post(_circuit_url("partner-api", "trip"), {"seconds": "-3"}, follow=True)
    assert "Seconds must be a positive number" in response.content.decode()
    assert Circuit("partner-api").state()["state"] == "closed"


def test_an_operator_switches_a_degraded_mode_on_with_a_reason_and_off(client):
    operator = _staff(client, "operator", "view_sharedstate", "change_sharedstate")
    url = reverse("admin:recovery_sharedstate_degraded")
    response = operator.post(url, {"mode": "read-only", "state": "on", "reason": ""}, follow=True)
    assert "Say why read-only is switched on" in response.content.decode()
    assert not degraded.is_on("read-only")
    operator.post(url, {"mode": "read-only", "state": "on", "reason": "failover"})
    assert degraded.is_on("read-only")
    assert degraded.status()["read-only"]["actor"] == "admin:operator"
    operator.post(url, {"mode": "read-only", "state": "off"})
    assert not degraded.is_on("read-only")
    response = operator.post(url, {"mode": "<script>", "state": "on", "reason": "x"}, follow=True)
    assert "is not a mode name" in response.content.decode()
    assert "<script>" not in degraded.status()


def test_the_page_survives_an_unreachable_store(client, settings):
    viewer = _staff(client, "viewer", "view_sharedstate")
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": UNREACHABLE}
    response = viewer.get(reverse(OVERVIEW))
    assert response.status_code == 200
    page = response.content.decode()
    assert "unknown: ConnectionError" in page
    assert "The shared state cannot be read" in page


# -- fallback uses ---------------------------------------------------------------------------------


@pytest.fixture
def uses():
    FallbackUse.objects.create(task_id="t-1", task_name="shop.tasks.quote", fallback="shop.backup",
                               reason="gave_up", exception_type="requests.exceptions.HTTPError",
                               exception_message="503 Server Error")
    FallbackUse.objects.create(task_id="t-2", task_name="shop.tasks.report",
                               fallback="shop.cached", reason="degraded", dependency="read-only")


def test_fallback_uses_are_listed_and_filtered_read_only(client, uses):
    viewer = _staff(client, "viewer", "view_fallbackuse")
    url = reverse("admin:recovery_fallbackuse_changelist")

    def rows(**query) -> str:
        page = viewer.get(url, query).content.decode()
        return page.split('id="result_list"', 1)[1].split("</table>", 1)[0]

    assert "shop.tasks.quote" in rows() and "shop.tasks.report" in rows()
    filtered = rows(reason__exact="gave_up")
    assert "shop.tasks.quote" in filtered and "shop.tasks.report" not in filtered
    by_task = rows(task_name="shop.tasks.report")
    assert "shop.tasks.report" in by_task and "shop.tasks.quote" not in by_task
    use = FallbackUse.objects.get(task_id="t-1")
    detail = viewer.get(reverse("admin:recovery_fallbackuse_change", args=[use.pk]))
    assert detail.status_code == 200 and "503 Server Error" in detail.content.decode()
    assert 'name="_save"' not in detail.content.decode()


def test_fallback_uses_cannot_be_added_changed_or_deleted_even_by_a_superuser(client, uses):
    admin_user = get_user_model().objects.create_superuser("root", password="pw")
    client.force_login(admin_user)
    use = FallbackUse.objects.get(task_id="t-1")
    assert client.get(reverse("admin:recovery_fallbackuse_add")).status_code == 403
    assert client.post(reverse("admin:recovery_fallbackuse_change", args=[use.pk]),
                       {"reason": "degraded"}).status_code == 403
    assert client.post(reverse("admin:recovery_fallbackuse_delete", args=[use.pk]),
                       {"post": "yes"}).status_code == 403
    assert FallbackUse.objects.get(pk=use.pk).reason == "gave_up"


def test_the_overview_counts_recent_fallback_uses(client, uses):
    viewer = _staff(client, "viewer", "view_sharedstate")
    page = viewer.get(reverse(OVERVIEW)).content.decode()
    assert '<strong id="fallbacks-24h">2</strong>' in page
