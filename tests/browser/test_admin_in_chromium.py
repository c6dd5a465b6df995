"""The dead-letter admin in a real headless Chromium, over HTTP, with a real Celery worker:
log in, filter the list, open a letter, fix its payload, replay it, see it resolved."""

from __future__ import annotations

import os
import re
import uuid

import pytest
from celery.result import AsyncResult
from django.urls import reverse
from playwright.sync_api import expect

from recovery.models import DeadLetter, DeadLetterEvent
from tests.integration import worker_tasks as t
from tests.integration.harness import wait_for

from .conftest import CHROMIUM, log_in, make_staff

pytestmark = pytest.mark.browser

TIMES_TEN = "tests.integration.worker_tasks.times_ten_unless_broken"
DECLINED = "tests.integration.worker_tasks.declined"
OPERATOR_PERMS = ("view_deadletter", "change_deadletter", "replay_deadletter")


def test_debian_chromium_is_installed():
    """Without the browser the tests below error out in setup; this one names the cause."""
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: run scripts/ensure-services.sh (apt-get install chromium)")


def other_letter(task_name: str, status: str, *args) -> DeadLetter:
    """A letter written directly, so the list has something to filter out."""
    return DeadLetter.objects.create(
        task_id=uuid.uuid4().hex, task_name=task_name, args=list(args), status=status,
        kind=DeadLetter.Kind.DEPENDENCY, exception_type="DependencyError",
        exception_message="upstream said no", fingerprint=uuid.uuid4().hex[:40])


def result_rows(page):
    return page.locator("#result_list tbody tr")


def click_filter(page, title: str, choice: str) -> None:
    """Click one choice in the change list's filter sidebar."""
    link = page.locator(f'#changelist-filter details[data-filter-title="{title}"] a',
                        has_text=re.compile(f"^{re.escape(choice)}$"))
    with page.expect_navigation():
        link.click()


def assert_only_local(page, live_server) -> None:
    assert page.requests, "the page made no requests at all"
    assert page.requests.external(live_server) == [], "the admin loaded external resources"


@pytest.mark.integration
def test_filter_open_edit_replay_resolved(page, live_server, start_worker, store, key):
    # Given a letter parked by a real worker (its price list was corrupt) ...
    start_worker()
    result = t.times_ten_unless_broken.delay(6, key)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first(), 30,
                      message="parked letter")
    # ... among letters of other tasks and statuses, and an operator who may replay
    others = [other_letter(TIMES_TEN, DeadLetter.Status.RESOLVED, 1, "old"),
              other_letter(DECLINED, DeadLetter.Status.PARKED, "k", 7),
              other_letter(DECLINED, DeadLetter.Status.DISCARDED, "k", 8)]
    make_staff("night-shift", *OPERATOR_PERMS)

    # When the operator logs in and narrows the list to parked price-list failures
    log_in(page, "night-shift", next_path=reverse("admin:recovery_deadletter_changelist"))
    expect(page).to_have_url(re.compile(r"/admin/recovery/deadletter/$"))
    expect(result_rows(page)).to_have_count(4)
    click_filter(page, "status", "Parked")
    expect(result_rows(page)).to_have_count(2)
    click_filter(page, "task name", TIMES_TEN)
    assert "status__exact=parked" in page.url and "task_name=" in page.url
    # Then only the real parked letter is left
    expect(result_rows(page)).to_have_count(1)
    row = result_rows(page).first
    expect(row.locator("td.field-status")).to_have_text("Parked")
    link = row.locator(f'a[href*="/deadletter/{letter.pk}/change/"]')
    expect(link).to_have_count(1)
    for other in others:
        expect(page.locator(f'#result_list a[href*="/deadletter/{other.pk}/change/"]')
               ).to_have_count(0)

    # When they open it, follow "Replay…" and point the payload at a good price list
    with page.expect_navigation():
        link.click()
    expect(page).to_have_url(re.compile(rf"/admin/recovery/deadletter/{letter.pk}/change/"))
    expect(page.locator(".field-status .readonly")).to_have_text("Parked")
    expect(page.locator(".field-exception_message_shown .readonly")).to_contain_text("is corrupt")
    with page.expect_navigation():
        page.get_by_role("link", name="Replay…").click()
    args = page.locator("textarea#id_args")
    expect(args).to_contain_text(key)
    good_key = key + "-good"
    store.set(f"t:fixed:{good_key}", 1)
    args.fill(f'[6, "{good_key}"]')
    page.fill("#id_note", "pointed at v2 prices")
    with page.expect_navigation():
        page.click('input[type=submit][value="Replay"]')

    # Then the admin confirms it, and once the worker has run it the letter shows resolved
    expect(page.locator("ul.messagelist li")).to_have_text(
        f"Dead letter {letter.pk} was replayed with the edited payload.")
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).status == DeadLetter.Status.RESOLVED,
             30, message="resolved letter")
    page.reload()
    expect(page.locator(".field-status .readonly")).to_have_text("Resolved")
    expect(page.locator(".field-args_pretty")).to_contain_text(good_key)
    expect(page.get_by_role("link", name="Replay…")).to_have_count(0)
    assert AsyncResult(result.id).get(timeout=10) == 60
    letter.refresh_from_db()
    assert letter.args == [6, good_key]
    assert sorted(letter.events.values_list("action", "actor")) == [
        ("edited", "night-shift"), ("replayed", "night-shift")]
    assert_only_local(page, live_server)


def test_malformed_json_shows_the_error_and_changes_nothing(page, live_server):
    letter = other_letter(TIMES_TEN, DeadLetter.Status.PARKED, 3, "abc")
    before = DeadLetter.objects.filter(pk=letter.pk).values().get()
    make_staff("night-shift", *OPERATOR_PERMS)
    log_in(page, "night-shift")

    page.goto(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    with page.expect_navigation():
        page.get_by_role("link", name="Replay…").click()
    page.fill("textarea#id_args", '[3, "abc"')
    with page.expect_navigation():
        page.click('input[type=submit][value="Replay"]')

    # The form comes back with the error, the typed text kept, and no success message
    expect(page.locator(".errorlist")).to_contain_text("Not valid JSON")
    expect(page.locator("textarea#id_args")).to_have_value('[3, "abc"')
    expect(page.locator("ul.messagelist")).to_have_count(0)
    assert DeadLetter.objects.filter(pk=letter.pk).values().get() == before
    assert not DeadLetterEvent.objects.filter(letter=letter).exists()
    assert_only_local(page, live_server)


def test_without_replay_permission_no_link_and_403(page, live_server):
    letter = other_letter(TIMES_TEN, DeadLetter.Status.PARKED, 3, "abc")
    make_staff("viewer", "view_deadletter", "change_deadletter")
    log_in(page, "viewer")

    page.goto(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
    expect(page.locator(".field-status .readonly")).to_have_text("Parked")
    expect(page.get_by_role("link", name="Replay…")).to_have_count(0)
    response = page.goto(reverse("admin:recovery_deadletter_replay", args=[letter.pk]))
    assert response.status == 403
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.PARKED and letter.replay_count == 0
    assert_only_local(page, live_server)
