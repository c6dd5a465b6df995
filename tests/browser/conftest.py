"""Real headless Chromium (Debian's ``chromium`` package) driven by Playwright against the
admin served over HTTP by pytest-django's ``live_server``.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``, which
``scripts/ensure-services.sh`` installs with apt-get. A missing browser fails the tests.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from playwright.sync_api import expect, sync_playwright

# Real Celery workers on the test broker and database, shared with the integration tests.
from tests.integration.conftest import key, start_worker, store, worker_env  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per module."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
                    "(scripts/ensure-services.sh installs it with apt-get)", pytrace=False)
    # Playwright's sync API keeps its asyncio loop marked as running on this thread, so
    # Django would take the tests' own ORM calls for calls from async code. They are not.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


class Requests(list):
    """Every URL the page asked for."""

    def external(self, live_server) -> list[str]:
        here = urlsplit(live_server.url).netloc
        return [url for url in self if urlsplit(url).netloc != here]


#: reports each Content-Security-Policy violation of a page as a console error
CSP_WATCH = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} refused ${e.blockedURI || "inline"}`
                + ` in ${e.sourceFile || document.URL}:${e.lineNumber}`);
});
"""


def csp_violation(text: str) -> bool:
    """A console message about a refused resource: ours (``CSP_WATCH``) or Chromium's own."""
    return text.startswith("CSP violation:") or "Content Security Policy" in text


@pytest.fixture
def page(browser, live_server):
    """A fresh browser context (no cookies) on the live server; ``page.requests`` lists
    every URL it requested, ``page.csp_violations`` every Content-Security-Policy
    violation. A test whose pages violated the policy fails at teardown: the admin must
    work with the policy on (config/settings.py), no inline script or style refused."""
    context = browser.new_context(base_url=live_server.url)
    context.set_default_timeout(10_000)
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    page.requests = Requests()
    page.csp_violations = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("console", lambda message: page.csp_violations.append(message.text)
            if message.type == "error" and csp_violation(message.text) else None)
    yield page
    violations = list(page.csp_violations)
    context.close()
    if violations:
        pytest.fail("Content-Security-Policy violations:\n" + "\n".join(violations),
                    pytrace=False)


def make_staff(username: str, *codenames: str):
    user = get_user_model().objects.create_user(username, password="correct horse", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="recovery",
                                                         codename__in=codenames))
    return user


def log_in(page, username: str, password: str = "correct horse", next_path: str = "/admin/"):
    """Through the admin's login form, as a person would."""
    page.goto(f"/admin/login/?next={next_path}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    with page.expect_navigation():
        page.click("input[type=submit]")
    expect(page.locator("#user-tools")).to_contain_text(username, ignore_case=True)
