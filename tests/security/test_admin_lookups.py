"""Filter lookups as an oracle: a staff user who may only view dead letters (saga runs,
incidents, fallback uses) types lookups into the change list's query string and compares
result counts, learning a secret one bit per request. Every admin answers such a lookup
with 400 unless the user may reveal secrets; the documented filters keep working."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from recovery.models import DeadLetter, FallbackUse, Incident, SagaRun, SagaStep

from .staff_users import staff  # noqa: F401 - the fixture

pytestmark = pytest.mark.django_db

TOKEN = "tok_live_c0ffee"


@pytest.fixture
def secret_letter() -> DeadLetter:
    return DeadLetter.objects.create(
        task_id="lk-1", task_name="shop.tasks.charge", args=[TOKEN, 100],
        kwargs={"card_token": TOKEN, "amount_cents": 100},
        headers={"headers": {"authorization": f"Bearer {TOKEN}"}},
        raw_body=f'{{"card_token": "{TOKEN}"}}', traceback=f"ValueError: {TOKEN}",
        history=[{"attempt": 1, "exception_message": f"declined {TOKEN}"}],
        fingerprint="a" * 40, status=DeadLetter.Status.PARKED,
        kind=DeadLetter.Kind.DEPENDENCY)


def result_count(response) -> int:
    assert response.status_code == 200, response.status_code
    return response.context["cl"].result_count


def changelist(model: str) -> str:
    return reverse(f"admin:recovery_{model}_changelist")


def test_a_viewer_cannot_read_a_card_token_by_regex_bisection(staff, secret_letter):
    c = staff("view_deadletter")
    url = changelist("deadletter")
    # Before the fix the two answers differed (1 letter, then 0): one bit of the token.
    seen = {}
    for pattern in ("^tok_live_[a-m]", "^tok_live_[n-z]"):
        response = c.get(url, {"kwargs__card_token__regex": pattern})
        seen[pattern] = (response.status_code, response.context["cl"].result_count
                         if response.status_code == 200 else None)
    assert seen == {"^tok_live_[a-m]": (400, None), "^tok_live_[n-z]": (400, None)}, seen


PAYLOAD_LOOKUPS = {
    "deadletter": [
        ("kwargs__card_token__regex", "^tok_live_c"),
        ("kwargs__card_token", TOKEN),
        ("kwargs__has_key", "card_token"),
        ("args__0__startswith", "tok_live"),
        ("args__contains", f'["{TOKEN}"]'),
        ("headers__headers__authorization__contains", "tok_live"),
        ("raw_body__contains", "tok_live"),
        ("traceback__contains", "tok_live"),
        ("history__0__exception_message__contains", "tok_live"),
        ("exception_message__regex", "tok_live"),
        ("events__before__kwargs__card_token__startswith", "tok"),
        ("events__after__kwargs__card_token__startswith", "tok"),
        ("worker__regex", "."),
    ],
    "sagarun": [
        ("context__card_token__startswith", "tok_live"),
        ("context__contains", f'{{"card_token": "{TOKEN}"}}'),
        ("error__contains", "tok_live"),
        ("definition__contains", "{}"),
        ("steps__result__token__startswith", "tok_live"),
        ("steps__error__contains", "tok_live"),
        ("idempotency_key__startswith", "tok"),
    ],
    "incident": [
        ("details__kwargs__card_token__startswith", "tok_live"),
        ("details__traceback__contains", "tok_live"),
        ("note__contains", "tok"),
        ("letters__kwargs__card_token__startswith", "tok_live"),
    ],
    "fallbackuse": [
        ("exception_message__contains", "tok_live"),
    ],
}

VIEW = {"deadletter": "view_deadletter", "sagarun": "view_sagarun",
        "incident": "view_incident", "fallbackuse": "view_fallbackuse"}


@pytest.mark.parametrize("model,lookup,value", [
    (model, lookup, value) for model, lookups in PAYLOAD_LOOKUPS.items()
    for lookup, value in lookups])
def test_a_lookup_into_a_payload_field_is_refused_with_400(staff, secret_letter, model, lookup,
                                                            value):
    run = SagaRun.objects.create(name="order", context={"card_token": TOKEN},
                                 error=f"declined {TOKEN}", definition={"steps": []})
    SagaStep.objects.create(run=run, index=0, task_name="shop.tasks.charge",
                            result={"token": TOKEN}, error=TOKEN)
    incident = Incident.objects.create(fingerprint="a" * 40, reason=Incident.Reason.CRITICAL_TASK,
                                       title="charge failed",
                                       details={"kwargs": {"card_token": TOKEN},
                                                "traceback": TOKEN})
    incident.letters.add(secret_letter)
    FallbackUse.objects.create(task_id="f-1", task_name="shop.tasks.charge", fallback="x",
                               reason=FallbackUse.Reason.GAVE_UP,
                               exception_message=f"declined {TOKEN}")
    c = staff(VIEW[model])
    response = c.get(changelist(model), {lookup: value})
    assert response.status_code == 400, response.status_code


def test_a_user_who_may_reveal_secrets_may_filter_by_payload(staff, secret_letter):
    DeadLetter.objects.create(task_id="lk-2", task_name="shop.tasks.charge",
                              kwargs={"card_token": "tok_live_zzz"}, fingerprint="b" * 40)
    c = staff("view_deadletter", "reveal_deadletter_secrets")
    url = changelist("deadletter")
    assert result_count(c.get(url, {"kwargs__card_token": TOKEN})) == 1
    assert result_count(c.get(url, {"args__0__startswith": "tok_live_c"})) == 1


def test_searching_never_looks_into_arguments_for_a_viewer(staff, secret_letter):
    c = staff("view_deadletter")
    url = changelist("deadletter")
    for term in (TOKEN, "tok_live", "card_token"):
        assert result_count(c.get(url, {"q": term})) == 0, term
    # the search still finds what it is for
    assert result_count(c.get(url, {"q": "lk-1"})) + result_count(c.get(url, {"q": "shop.tasks"})) >= 1


DOCUMENTED = {
    "deadletter": [
        {"fingerprint": "a" * 40},
        {"status__exact": "parked"},
        {"status__exact": "parked", "kind__exact": "dependency"},
        {"task_name": "shop.tasks.charge"},
        {"last_failed_at__gte": "2020-01-01T00:00:00+00:00",
         "last_failed_at__lt": "2100-01-01T00:00:00+00:00"},
        {"kind__exact": "dependency", "status__exact": "parked",
         "last_failed_at__gte": "2020-01-01T00:00:00+00:00"},
        {"last_failed_at__year": "2026"},
        {"last_failed_at__isnull": "False"},
        {"q": "lk-1", "o": "1"},
    ],
    "incident": [
        {"status__in": "open,acknowledged"},
        {"status__exact": "open", "severity__exact": "critical"},
        {"reason__exact": "critical_task"},
    ],
    "sagarun": [
        {"waiting": "needs_human"},
        {"waiting": "any"},
        {"status__exact": "held"},
        {"name": "order"},
    ],
    "fallbackuse": [
        {"reason__exact": "circuit_open"},
        {"task_name": "shop.tasks.charge"},
        {"at__gte": "2020-01-01T00:00:00+00:00"},
    ],
}


@pytest.mark.parametrize("model,params", [
    (model, params) for model, many in DOCUMENTED.items() for params in many])
def test_the_documented_filters_keep_working_for_a_viewer(staff, secret_letter, model, params):
    c = staff(VIEW[model])
    response = c.get(changelist(model), params)
    assert response.status_code == 200, response.status_code
    assert "e" not in response.wsgi_request.GET


def test_every_link_the_project_makes_to_the_letter_list_opens_for_a_viewer(staff, secret_letter):
    """The dashboard's and the change page's links, followed by a view-only user."""
    c = staff("view_deadletter")
    pages = [reverse("admin:recovery_dashboard"),
             reverse("admin:recovery_deadletter_change", args=[secret_letter.pk])]
    links = set()
    for page in pages:
        html = c.get(page).content.decode()
        links |= {href.replace("&amp;", "&") for href in re.findall(r'href="([^"]+)"', html)
                  if href.startswith(changelist("deadletter") + "?")}
    assert links, "no filtered links found"
    for link in sorted(links):
        response = c.get(link)
        assert response.status_code == 200, (link, response.status_code)


def test_searching_exception_text_stored_before_scrubbing_is_no_oracle_for_a_viewer(staff):
    # Given a letter stored by an older version, its exception text quoting a card token
    DeadLetter.objects.create(task_id="lk-old", task_name="shop.tasks.charge",
                              kwargs={"card_token": TOKEN}, fingerprint="c" * 40,
                              exception_message=f"card {TOKEN} declined")
    FallbackUse.objects.create(task_id="fb-old", task_name="shop.tasks.charge",
                               fallback="shop.tasks.queue_charge", reason="gave_up",
                               exception_message=f"card {TOKEN} declined")
    # When a view-only user searches for the token's beginning, one guess at a time
    viewer = staff("view_deadletter", "view_fallbackuse")
    for model in ("deadletter", "fallbackuse"):
        # Then nothing is found, whatever the guess
        for guess in (TOKEN[:10], TOKEN, "declined"):
            assert result_count(viewer.get(changelist(model), {"q": guess})) == 0, (model, guess)
    # while a user who may reveal secrets still searches the text
    revealer = staff("view_deadletter", "view_fallbackuse", "reveal_deadletter_secrets")
    assert result_count(revealer.get(changelist("deadletter"), {"q": "declined"})) == 1
    assert result_count(revealer.get(changelist("fallbackuse"), {"q": "declined"})) == 1
