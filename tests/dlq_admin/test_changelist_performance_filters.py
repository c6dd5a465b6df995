"""The change list's index-friendly pieces (dlq_admin/changelist.py) show what Django's
defaults showed: the task-name choices, the date drill-down, search results, counts."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone as dt_timezone

import pytest
from django.urls import reverse
from django.utils import timezone

from dlq_admin import changelist
from recovery.models import DeadLetter

pytestmark = pytest.mark.django_db

URL = reverse("admin:recovery_deadletter_changelist")


def letter(n: int, *, task_name: str = "shop.tasks.charge", at: datetime | None = None,
           task_id: str | None = None, message: str = "declined", **fields) -> DeadLetter:
    at = at or datetime(2026, 10, 5, 12, 0, tzinfo=dt_timezone.utc)
    return DeadLetter.objects.create(
        task_id=task_id or f"task-{n}", task_name=task_name, fingerprint="f" * 40,
        exception_message=message, first_failed_at=at, last_failed_at=at, **fields)


def row_ids(response) -> set[int]:
    page = response.content.decode()
    return {int(pk) for pk in re.findall(r'name="_selected_action" value="(\d+)"', page)}


def test_the_task_filter_lists_each_task_name_present_once_in_order(admin_client):
    for n, name in enumerate(["shop.tasks.refund", "crm.tasks.sync", "shop.tasks.refund",
                              "shop.tasks.charge", "crm.tasks.sync"]):
        letter(n, task_name=name)
    assert changelist.task_names() == ["crm.tasks.sync", "shop.tasks.charge", "shop.tasks.refund"]

    page = admin_client.get(URL).content.decode()
    for name in ("crm.tasks.sync", "shop.tasks.charge", "shop.tasks.refund"):
        assert f"?task_name={name}" in page


def test_the_task_filter_has_no_choices_on_an_empty_table():
    assert changelist.task_names() == []


def test_filtering_by_task_name_keeps_the_same_parameter_and_rows(admin_client):
    charge = letter(1, task_name="shop.tasks.charge")
    letter(2, task_name="shop.tasks.refund")
    assert row_ids(admin_client.get(URL, {"task_name": "shop.tasks.charge"})) == {charge.pk}


def test_date_hierarchy_offers_the_months_then_the_days_that_have_letters(admin_client):
    utc = dt_timezone.utc
    for n, at in enumerate([datetime(2026, 9, 3, 8, tzinfo=utc), datetime(2026, 9, 3, 20, tzinfo=utc),
                            datetime(2026, 9, 17, 1, tzinfo=utc), datetime(2026, 11, 2, 5, tzinfo=utc)]):
        letter(n, at=at)

    page = admin_client.get(URL).content.decode()  # one year only: Django starts at the months
    assert "last_failed_at__month=9" in page and "last_failed_at__month=11" in page
    assert "last_failed_at__month=10" not in page

    september = admin_client.get(URL, {"last_failed_at__year": 2026, "last_failed_at__month": 9})
    days = set(re.findall(r"last_failed_at__day=(\d+)", september.content.decode()))
    assert days == {"3", "17"}
    assert len(row_ids(september)) == 3


@pytest.mark.parametrize("tz", ["UTC", "America/Sao_Paulo", "Asia/Kolkata"])
@pytest.mark.parametrize("kind", ["year", "month", "day"])
@pytest.mark.parametrize("one_query", [True, False], ids=["postgresql", "other-databases"])
def test_dates_by_index_match_djangos_distinct_dates(tz, kind, one_query, monkeypatch):
    if not one_query:  # the query-per-date path other databases take
        monkeypatch.setattr(changelist._DatesByIndexQuerySet, "_firsts_in_one_query",
                            changelist._DatesByIndexQuerySet._firsts_one_by_one)
    utc = dt_timezone.utc
    for n, at in enumerate([datetime(2025, 12, 31, 23, 30, tzinfo=utc), datetime(2026, 1, 1, 2, tzinfo=utc),
                            datetime(2026, 3, 1, 1, tzinfo=utc), datetime(2026, 3, 1, 4, tzinfo=utc),
                            datetime(2026, 7, 14, 12, tzinfo=utc)]):
        letter(n, at=at, status="resolved" if n % 2 else "parked")
    with timezone.override(tz):
        for selection in (DeadLetter.objects.all(), DeadLetter.objects.filter(status="parked")):
            indexed = changelist._DatesByIndexQuerySet(model=DeadLetter, query=selection.query.chain())
            expected = list(selection.datetimes("last_failed_at", kind))
            assert indexed.datetimes("last_failed_at", kind) == expected
            assert indexed.datetimes("last_failed_at", kind, order="DESC") == expected[::-1]


def test_search_by_task_id_finds_that_letter_only(admin_client):
    task_id = str(uuid.uuid4())
    wanted = letter(1, task_id=task_id)
    letter(2, message=f"parent {task_id} failed")  # mentions the id, but is not that task
    assert row_ids(admin_client.get(URL, {"q": task_id})) == {wanted.pk}
    assert row_ids(admin_client.get(URL, {"q": f"  {task_id.upper()} "})) == {wanted.pk}


def test_search_for_an_id_no_letter_has_still_searches_the_messages(admin_client):
    order_id = str(uuid.uuid4())
    mentions = letter(1, message=f"order {order_id} not found")
    letter(2)
    assert row_ids(admin_client.get(URL, {"q": order_id})) == {mentions.pk}


def test_search_by_words_still_uses_the_search_fields(admin_client):
    declined = letter(1, message="card declined")
    letter(2, message="timeout", task_name="crm.tasks.sync")
    assert row_ids(admin_client.get(URL, {"q": "declined"})) == {declined.pk}
    assert len(row_ids(admin_client.get(URL, {"q": "crm.tasks"}))) == 1


def test_counts_are_exact_up_to_the_bound_and_estimated_above(admin_client, monkeypatch):
    for n in range(7):
        letter(n)
    monkeypatch.setattr(changelist.EstimatedCountPaginator, "exact_up_to", 10)
    assert changelist.EstimatedCountPaginator(DeadLetter.objects.order_by("pk"), 50).count == 7
    assert "7 dead letters" in admin_client.get(URL).content.decode()

    monkeypatch.setattr(changelist.EstimatedCountPaginator, "exact_up_to", 3)
    estimated = changelist.EstimatedCountPaginator(DeadLetter.objects.order_by("pk"), 2)
    assert estimated.count >= 4  # more than the bound: never fewer than it counted
    page = estimated.page(1)
    assert len(page.object_list) == 2
    assert admin_client.get(URL).status_code == 200
