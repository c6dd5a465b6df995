"""Hostile admin URLs: ids that are not numbers, lookups with garbage values, a NUL byte
(PostgreSQL refuses it in any string), a 10 KB fingerprint. Each answers 404, 400 or the
admin's own "invalid lookup" redirect (``?e=1``) or "does not exist" redirect to the
index, never a 500, and changes nothing."""

from __future__ import annotations

import pytest
from django.test import Client

from recovery.models import DeadLetter, Incident, SagaRun

pytestmark = pytest.mark.django_db

ALL = ("view_deadletter", "change_deadletter", "replay_deadletter", "discard_deadletter", "resolve_deadletter",
       "compensate_deadletter", "view_sagarun", "resume_sagarun", "compensate_sagarun",
       "view_incident", "acknowledge_incident", "resolve_incident", "view_fallbackuse")

DL = "/admin/recovery/deadletter/"
#: outcomes: a status code, or where the admin's own redirects end
INVALID = "the change list's ?e=1 page"  # Django's "invalid lookup" redirect
GONE = "the admin index"  # Django's "object does not exist" redirect, with a message

CASES = [
    # ids that are not numbers, hold a NUL, or are too large for the column
    ("get", f"{DL}abc/change/", {}, GONE),
    ("post", f"{DL}abc/change/", {}, 403),
    ("get", f"{DL}abc/replay/", {}, GONE),
    ("get", f"{DL}abc/discard/", {}, GONE),
    ("post", f"{DL}abc/discard/", {"note": "x"}, GONE),
    ("get", f"{DL}abc/resolve/", {}, GONE),
    ("get", f"{DL}abc/compensate/", {}, GONE),
    ("get", f"{DL}1%00/change/", {}, GONE),
    ("get", f"{DL}99999999999999999999/change/", {}, GONE),
    ("get", f"{DL}99999999999999999999/replay/", {}, 404),
    ("get", f"{DL}-1/change/", {}, GONE),
    ("get", "/admin/recovery/sagarun/abc/change/", {}, GONE),
    ("get", "/admin/recovery/sagarun/abc/resume/", {}, GONE),
    ("get", "/admin/recovery/sagarun/abc/compensate/", {}, GONE),
    ("get", "/admin/recovery/sagarun/99999999999999999999/change/", {}, GONE),
    ("get", "/admin/recovery/incident/abc/change/", {}, GONE),
    ("get", "/admin/recovery/incident/abc/acknowledge/", {}, GONE),
    ("get", "/admin/recovery/incident/99999999999999999999/change/", {}, GONE),
    # lookups the change list does not allow, or values that are not what they claim
    ("get", DL, {"id__in": "abc"}, 400),
    ("get", DL, {"pk": "abc"}, 400),
    ("get", DL, {"_to_field": "kwargs"}, 400),
    ("get", DL, {"status": "<script>alert(1)</script>"}, 200),
    ("get", DL, {"status__exact": "garbage"}, 200),
    ("get", DL, {"status__in": "parked,,garbage"}, 200),
    ("get", DL, {"last_failed_at__gte": "notadate"}, INVALID),
    ("get", DL, {"last_failed_at__lt": "2026-13-45"}, INVALID),
    ("get", DL, {"last_failed_at__year": "abc"}, INVALID),
    ("get", DL, {"last_failed_at__year": "2026", "last_failed_at__month": "13"}, INVALID),
    ("get", DL, {"last_failed_at__isnull": "maybe"}, 200),
    ("get", DL, {"p": "abc"}, 200),
    ("get", DL, {"p": "99999"}, 200),
    ("get", DL, {"o": "99.-abc"}, 200),
    ("get", DL, {"fingerprint": "x" * 10_000}, 200),
    # PostgreSQL refuses a NUL in any text: refused before it reaches the database
    ("get", DL, {"fingerprint": "a\x00b"}, 400),
    ("get", DL, {"task_name": "a\x00b"}, 400),
    ("get", DL, {"kind__exact": "a\x00b"}, 400),
    ("get", DL, {"q": "a\x00b"}, 200),
    ("get", f"{DL}groups/{'f' * 10_000}/", {}, 404),
    ("get", f"{DL}groups/{'f' * 10_000}/", {"operation": "replay"}, 404),
    ("get", f"{DL}groups/a%00b/", {}, 404),
    ("post", f"{DL}groups/a%00b/", {"operation": "discard", "post": "yes"}, 404),
    ("get", f"{DL}groups/", {"status": "a\x00b"}, 200),
    ("get", "/admin/recovery/incident/", {"status__in": "open,\x00"}, 400),
    ("get", "/admin/recovery/incident/", {"q": "\x00"}, 200),
    ("get", "/admin/recovery/sagarun/", {"waiting": "garbage"}, 200),
    ("get", "/admin/recovery/sagarun/", {"q": "\x00"}, 200),
    ("get", "/admin/recovery/sagarun/", {"name": "\x00"}, 400),
    ("get", "/admin/recovery/fallbackuse/", {"at__gte": "never"}, INVALID),
    ("get", "/admin/recovery/fallbackuse/", {"q": "\x00"}, 200),
    ("get", "/admin/recovery/dashboard/", {"refresh": "\x00"}, 200),
    # a NUL in what an operator posts about a real letter
    ("post", DL + "{pk}/discard/", {"note": "a\x00b"}, "the letter's page"),
    ("post", DL + "{pk}/replay/", {"args": '["E\\u0000UR"]', "kwargs": "{}"}, 200),
    ("post", DL + "{pk}/replay/", {"args": '["EUR"]', "kwargs": "{}", "note": "a\x00b"}, 200),
    ("post", DL + "{pk}/replay/", {"args": '["EUR"]', "kwargs": '{"fail_times\\u0000": 1}'},
     200),
]


@pytest.fixture
def operator(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="recovery",
                                                         codename__in=ALL))
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def outcome(client, method: str, url: str, params: dict):
    """Where the request ends, following the admin's redirects: a status code, INVALID
    or GONE; and the status codes on the way (none may be a 500)."""
    response = getattr(client, method)(url, params, follow=True)
    codes = [code for _, code in response.redirect_chain] + [response.status_code]
    path = response.wsgi_request.get_full_path()
    if response.status_code == 200 and path.endswith("?e=1"):
        return INVALID, codes
    if response.status_code == 200 and path == "/admin/" and response.redirect_chain:
        return GONE, codes
    return response.status_code, codes


@pytest.mark.parametrize("method,url,params,expected", CASES,
                         ids=[f"{m} {u[:60]}{p}"[:100] for m, u, p, _ in CASES])
def test_a_hostile_url_gets_a_clear_answer_not_a_500(operator, method, url, params, expected):
    letter = DeadLetter.objects.create(task_id="h-1", task_name="tasks.tasks.fetch_exchange_rate",
                                       args=["EUR"], fingerprint="a" * 40)
    before = list(DeadLetter.objects.values_list("pk", "status", "replay_count"))
    ended, codes = outcome(operator, method, url.format(pk=letter.pk), params)
    if expected == "the letter's page":
        expected = 200  # the refusal is a message on it
    assert 500 not in codes and ended == expected, (ended, codes)
    assert list(DeadLetter.objects.values_list("pk", "status", "replay_count")) == before
    assert letter.pk and not SagaRun.objects.exists() and not Incident.objects.exists()


@pytest.mark.parametrize("url", [DL, f"{DL}{{pk}}/change/", f"{DL}{{pk}}/replay/", f"{DL}groups/",
                                 "/admin/recovery/dashboard/", "/admin/", "/admin/recovery/incident/"])
def test_admin_pages_carry_a_content_security_policy_without_inline_script(operator, url):
    letter = DeadLetter.objects.create(task_id="h-1", task_name="tasks.tasks.fetch_exchange_rate",
                                       args=["EUR"], fingerprint="a" * 40)
    response = operator.get(url.format(pk=letter.pk))
    assert response.status_code == 200
    policy = dict(part.strip().split(" ", 1)
                  for part in response.headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert (policy["object-src"], policy["frame-ancestors"], policy["base-uri"]) == \
        ("'none'", "'none'", "'self'")
