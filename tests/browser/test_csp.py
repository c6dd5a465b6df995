"""The operator pages in a real Chromium with the Content-Security-Policy on: every page an
operator opens loads and works with nothing refused, and the watch that fails a test on a
violation (``page`` in conftest.py) does catch an inline script."""

from __future__ import annotations

import pytest
from django.urls import reverse
from playwright.sync_api import expect

from recovery.models import DeadLetter, Incident, SagaRun

from .conftest import log_in, make_staff

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

EVERYTHING = ("view_deadletter", "change_deadletter", "replay_deadletter", "discard_deadletter",
              "resolve_deadletter", "compensate_deadletter", "reveal_deadletter_secrets",
              "view_sagarun", "view_incident", "acknowledge_incident", "view_sharedstate",
              "view_fallbackuse")


def test_the_csp_watch_catches_an_inline_script(page, live_server):
    # Given the login page as served, with an inline script and style slipped in
    def inject(route):
        served = route.fetch()
        body = served.text().replace(
            "</body>", '<script>document.title = "ran"</script><p style="color:red">x</p></body>')
        route.fulfill(response=served, body=body)

    page.route("**/admin/login/**", inject)
    # When the browser loads it
    page.goto("/admin/login/")
    # Then the policy refused both, and the watch saw it
    expect(page.locator("#id_username")).to_be_visible()
    page.wait_for_function("document.readyState === 'complete'")
    assert page.title() != "ran"
    refused = " ".join(page.csp_violations)
    assert "script-src" in refused and "style-src" in refused, page.csp_violations
    page.csp_violations.clear()  # expected here; any other test fails on them


def test_every_operator_page_works_under_the_policy(page, live_server):
    # Given letters (one with a secret), a failure group, an incident and a saga run
    letter = DeadLetter.objects.create(
        task_id="csp-1", task_name="tasks.tasks.import_customer_row",
        args=[{"id": 1, "email": "a@b.c", "password": "hunter2"}], fingerprint="c" * 40,
        kind=DeadLetter.Kind.DATA_INTEGRITY, exception_type="InvalidRow", exception_message="no")
    DeadLetter.objects.create(task_id="csp-2", task_name=letter.task_name, args=[{"id": 2}],
                              fingerprint="c" * 40)
    incident = Incident.objects.create(fingerprint="c" * 40, reason=Incident.Reason.THRESHOLD,
                                       title="imports failing", details={"args": [1]})
    incident.letters.add(letter)
    run = SagaRun.objects.create(name="order", context={"order_id": 1}, definition={"steps": []})
    make_staff("csp-operator", *EVERYTHING)
    log_in(page, "csp-operator")
    pages = [
        reverse("admin:index"),
        reverse("admin:recovery_deadletter_changelist"),
        reverse("admin:recovery_deadletter_changelist") + "?status__exact=parked",
        reverse("admin:recovery_deadletter_change", args=[letter.pk]),
        reverse("admin:recovery_deadletter_change", args=[letter.pk]) + "?reveal=1",
        reverse("admin:recovery_deadletter_replay", args=[letter.pk]),
        reverse("admin:recovery_deadletter_discard", args=[letter.pk]),
        reverse("admin:recovery_deadletter_groups"),
        reverse("admin:recovery_deadletter_group", args=["c" * 40]),
        reverse("admin:recovery_deadletter_group", args=["c" * 40]) + "?operation=replay",
        reverse("admin:recovery_dashboard") + "?refresh=0",
        reverse("admin:recovery_incident_changelist"),
        reverse("admin:recovery_incident_change", args=[incident.pk]),
        reverse("admin:recovery_sagarun_changelist"),
        reverse("admin:recovery_sagarun_change", args=[run.pk]),
        reverse("admin:recovery_sharedstate_changelist"),
        reverse("admin:recovery_fallbackuse_changelist"),
    ]
    for url in pages:
        # When the operator opens each page
        response = page.goto(url)
        page.wait_for_load_state("load")
        # Then it answers and nothing on it was refused
        assert response.status == 200, url
        assert page.csp_violations == [], (url, page.csp_violations)

    # And the admin's own scripts run: the action bar's select-all counts the rows
    page.goto(reverse("admin:recovery_deadletter_changelist"))
    page.check("#action-toggle")
    expect(page.locator(".action-counter")).to_contain_text("2 of 2 selected")
    assert page.csp_violations == []


def test_every_confirmation_page_works_under_the_policy(page, live_server):
    # Given a parked letter, an open incident, a held saga run, and an operator who may act
    letter = DeadLetter.objects.create(
        task_id="csp-c1", task_name="tasks.tasks.charge_payment", args=[1, 500],
        fingerprint="c" * 40, exception_type="DependencyError", exception_message="declined")
    incident = Incident.objects.create(fingerprint="c" * 40, reason=Incident.Reason.THRESHOLD,
                                       title="payments failing")
    run = SagaRun.objects.create(name="order", status=SagaRun.Status.HELD,
                                 context={"order_id": 1}, definition={"steps": []})
    make_staff("csp-confirmer", *EVERYTHING, "resolve_incident", "resume_sagarun",
               "compensate_sagarun")
    log_in(page, "csp-confirmer")
    # When they open each operation's confirmation page
    for url_name, pk in [("deadletter_discard", letter.pk), ("deadletter_resolve", letter.pk),
                         ("deadletter_compensate", letter.pk),
                         ("incident_acknowledge", incident.pk), ("incident_resolve", incident.pk),
                         ("sagarun_resume", run.pk), ("sagarun_compensate", run.pk)]:
        response = page.goto(reverse(f"admin:recovery_{url_name}", args=[pk]))
        # Then it asks, and nothing on it was refused
        assert response.status == 200, url_name
        expect(page.locator("#content")).to_contain_text("You are about to")
        assert page.csp_violations == [], (url_name, page.csp_violations)
    # When they run a bulk action from a change list: the row, the action, Go, then Yes
    for model, action, done in [
            ("incident", "acknowledge_selected", "1 incident was acknowledged."),
            ("deadletter", "discard_selected", "1 dead letter was discarded.")]:
        page.goto(reverse(f"admin:recovery_{model}_changelist"))
        page.check("#result_list input.action-select")
        page.select_option("select[name=action]", action)
        with page.expect_navigation():
            page.get_by_role("button", name="Go").click()
        expect(page.locator("#content")).to_contain_text("You are about to")
        page.fill("#id_note", "from the browser")
        with page.expect_navigation():
            page.click('input[type=submit][value^="Yes, "]')
        # Then it is done, with one message, and the policy refused nothing
        expect(page.locator("ul.messagelist li")).to_have_text(done)
    assert page.csp_violations == []
