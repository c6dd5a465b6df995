"""Compensation and failure groups in the admin, through the Django test client,
on real PostgreSQL and a real Redis broker."""

from __future__ import annotations

import io
import json
import re
import shlex
from datetime import datetime, timezone as dt_timezone

import pytest
from django.conf import settings
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse

from recovery.models import DeadLetter, DeadLetterEvent

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"  # compensate="tasks.tasks.cancel_order"
COMPENSATION = "tasks.tasks.cancel_order"
NO_COMPENSATION = "tasks.tasks.fetch_exchange_rate"
CHANGELIST = "admin:recovery_deadletter_changelist"
GROUPS = "admin:recovery_deadletter_groups"
GROUP = "admin:recovery_deadletter_group"
FP = "d" * 40
OTHER_FP = "e" * 40


def make(n: int, **overrides) -> DeadLetter:
    values = dict(task_id=f"t-{n}", task_name=TASK, args=[n, 500], kwargs={},
                  fingerprint=FP, kind="dependency", exception_type="DependencyError",
                  exception_message=f"card declined for order {n}")
    values.update(overrides)
    return DeadLetter.objects.create(**values)


def operator(client, *codenames):
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_deadletter", *codenames)))
    client.force_login(user)
    return client


def post_action(client, action, letters, confirm=False, note=""):
    data = {"action": action, helpers.ACTION_CHECKBOX_NAME: [str(x.pk) for x in letters]}
    if confirm:
        data.update(post="yes", note=note)
    return client.post(reverse(CHANGELIST), data, follow=confirm)


def published(broker, queue: str = "celery") -> list[dict]:
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def statuses() -> dict[str, str]:
    return dict(DeadLetter.objects.values_list("task_id", "status"))


def assert_nothing_happened(broker, before: dict[str, str]) -> None:
    assert statuses() == before
    assert published(broker) == []
    assert not DeadLetterEvent.objects.exists()


# -- compensating selected letters --------------------------------------------------------


def test_bulk_compensate_asks_for_confirmation_then_compensates_with_one_message(client, broker):
    # Given two parked payments and one resolved one
    c = operator(client, "compensate_deadletter")
    letters = [make(1), make(2), make(3, status=DeadLetter.Status.RESOLVED)]
    # When the operator picks "Compensate selected dead letters"
    page = post_action(c, "compensate_selected", letters)
    # Then a confirmation page says what will run, and nothing has happened yet
    assert page.status_code == 200
    text = page.content.decode()
    assert "You are about to compensate 2 parked dead letters" in text
    assert "1 selected letter that is not parked will be left alone" in text
    assert f"{TASK} → {COMPENSATION}" in text
    assert 'name="action" value="compensate_selected"' in text
    assert published(broker) == [] and not DeadLetterEvent.objects.exists()
    assert statuses() == {"t-1": "parked", "t-2": "parked", "t-3": "resolved"}
    # When they confirm
    done = post_action(c, "compensate_selected", letters, confirm=True, note="orders void")
    # Then one message, the compensations published, the letters compensated and audited
    assert messages_of(done) == ["2 dead letters were compensated."]
    assert sorted((m["headers"]["task"], m["headers"]["id"], m["headers"]["recovery_compensates"])
                  for m in published(broker)) == [
        (COMPENSATION, "t-1.compensation", "t-1"), (COMPENSATION, "t-2.compensation", "t-2")]
    assert statuses() == {"t-1": "compensated", "t-2": "compensated", "t-3": "resolved"}
    assert DeadLetterEvent.objects.filter(action="compensated", actor="op",
                                          note="orders void").count() == 2


def test_bulk_compensate_of_one_letter_says_so_in_the_singular(client, broker):
    c = operator(client, "compensate_deadletter")
    done = post_action(c, "compensate_selected", [make(1)], confirm=True)
    assert messages_of(done) == ["1 dead letter was compensated."]
    assert len(published(broker)) == 1


def test_bulk_compensate_reports_letters_whose_task_declares_no_compensation(client, broker):
    c = operator(client, "compensate_deadletter")
    letters = [make(1), make(2, task_name=NO_COMPENSATION, args=["EUR"])]
    page = post_action(c, "compensate_selected", letters).content.decode()
    assert f"{NO_COMPENSATION} → no compensation declared" in page
    done = post_action(c, "compensate_selected", letters, confirm=True)
    [message] = messages_of(done)
    assert message.startswith("1 dead letter was compensated. 1 could not be: "
                              f"letter {letters[1].pk}: ")
    assert "declares no compensation" in message
    assert [m.level_tag for m in done.context["messages"]] == ["warning"]
    assert statuses() == {"t-1": "compensated", "t-2": "parked"}
    assert len(published(broker)) == 1


def test_the_compensate_action_needs_its_permission(client, broker):
    c = operator(client, "replay_deadletter", "discard_deadletter", "resolve_deadletter")
    letter = make(1)
    before = statuses()
    changelist = c.get(reverse(CHANGELIST)).content.decode()
    assert "compensate_selected" not in changelist and "discard_selected" in changelist
    response = post_action(c, "compensate_selected", [letter], confirm=True)
    assert "compensated" not in " ".join(messages_of(response))
    url = reverse("admin:recovery_deadletter_compensate", args=[letter.pk])
    assert c.get(url).status_code == 403
    assert c.post(url, {"note": "x"}).status_code == 403
    assert_nothing_happened(broker, before)


# -- compensating one letter --------------------------------------------------------------


def test_compensate_one_letter_confirms_then_compensates(client, broker):
    c = operator(client, "compensate_deadletter")
    letter = make(1)
    url = reverse("admin:recovery_deadletter_compensate", args=[letter.pk])
    # The confirmation page explains what runs, and changes nothing
    page = c.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert f"Compensate dead letter {letter.pk}?" in text
    assert "You are about to compensate 1 parked dead letter." in text
    assert f"{TASK} → {COMPENSATION}" in text
    assert 'name="post" value="yes"' in text and 'name="action"' not in text
    assert_nothing_happened(broker, {"t-1": "parked"})
    # Confirming compensates and goes back to the letter
    done = c.post(url, {"post": "yes", "note": "customer refunded"})
    assert done.status_code == 302
    assert done["Location"] == reverse("admin:recovery_deadletter_change", args=[letter.pk])
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.COMPENSATED
    [message] = published(broker)
    assert (message["headers"]["id"], message["headers"]["recovery_compensates"]) == (
        "t-1.compensation", "t-1")
    [event] = letter.events.all()
    assert (event.action, event.actor, event.note) == ("compensated", "op", "customer refunded")
    page = c.get(done["Location"])
    assert f"Dead letter {letter.pk} was compensated." in messages_of(page)


@pytest.mark.parametrize("overrides, error", [
    ({"task_name": NO_COMPENSATION, "args": ["EUR"]}, "declares no compensation"),
    ({"status": DeadLetter.Status.DISCARDED}, "only parked letters can be compensated"),
    ({"args": [1]}, "cannot take this letter's payload"),
])
def test_compensate_one_letter_that_cannot_be_shows_why_and_changes_nothing(client, broker,
                                                                            overrides, error):
    c = operator(client, "compensate_deadletter")
    letter = make(1, **overrides)
    before = statuses()
    page = c.post(reverse("admin:recovery_deadletter_compensate", args=[letter.pk]),
                  {"post": "yes"}, follow=True)
    [message] = page.context["messages"]
    assert error in str(message) and message.level_tag == "error"
    assert_nothing_happened(broker, before)


def test_the_compensate_link_shows_only_when_it_can_be_used(client, broker):
    payment = make(1)
    no_undo = make(2, task_name=NO_COMPENSATION, args=["EUR"], fingerprint=OTHER_FP)
    closed = make(3, status=DeadLetter.Status.COMPENSATED)

    def has_link(c, letter) -> bool:
        page = c.get(reverse("admin:recovery_deadletter_change", args=[letter.pk]))
        assert page.status_code == 200
        link = reverse("admin:recovery_deadletter_compensate", args=[letter.pk])
        return link in page.content.decode() and "Compensate…" in page.content.decode()

    c = operator(client, "compensate_deadletter")
    assert has_link(c, payment)
    assert not has_link(c, no_undo)  # its task declares no compensation
    assert not has_link(c, closed)  # not parked
    c.logout()
    viewer = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(
        codename__in=("view_deadletter", "discard_deadletter")))
    c.force_login(viewer)
    assert not has_link(c, payment)  # no permission


# -- failure groups ---------------------------------------------------------------------------


def at(day: int, hour: int = 10) -> datetime:
    return datetime(2026, 11, day, hour, 0, tzinfo=dt_timezone.utc)


@pytest.fixture
def two_groups():
    """Group FP: three parked payments and one resolved; group OTHER_FP: one parked fetch."""
    group = [make(n, first_failed_at=at(n), last_failed_at=at(n, 12)) for n in (1, 2, 3)]
    resolved = make(4, status=DeadLetter.Status.RESOLVED, first_failed_at=at(20),
                    last_failed_at=at(21))
    other = make(5, task_name=NO_COMPENSATION, args=["EUR"], fingerprint=OTHER_FP,
                 exception_type="TimeoutError", exception_message="rates API timed out",
                 first_failed_at=at(9), last_failed_at=at(9, 11))
    return group, resolved, other


def rows(page: str) -> list[list[str]]:
    table = page.split('<table id="failure-groups">', 1)[1].split("</table>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row, re.S) for row in table.split("<tr>")[2:]]


def test_groups_list_fingerprints_largest_first_with_counts_and_first_and_last_seen(client,
                                                                                   two_groups):
    c = operator(client)
    page = c.get(reverse(GROUPS))
    assert page.status_code == 200
    text = page.content.decode()
    # Parked letters by default: FP has 3, OTHER_FP has 1
    [first, second] = page.context["groups"]
    assert (first.fingerprint, first.total, first.parked) == (FP, 3, 3)
    assert (second.fingerprint, second.total, second.parked) == (OTHER_FP, 1, 1)
    assert (first.first_failed_at, first.last_failed_at) == (at(1), at(3, 12))
    assert first.task_name == TASK and first.exception_type == "DependencyError"
    assert first.sample_message.startswith("card declined for order")
    [row1, row2] = rows(text)
    assert row1[0] == TASK and row1[2:6] == ["3", "3", "2026-11-01 10:00", "2026-11-03 12:00"]
    assert row2[0] == NO_COMPENSATION and row2[2:6] == ["1", "1", "2026-11-09 10:00",
                                                        "2026-11-09 11:00"]
    assert reverse(GROUP, args=[FP]) in text and reverse(GROUP, args=[OTHER_FP]) in text
    assert "rates API timed out" in text


def test_groups_can_count_letters_of_every_status_or_of_one(client, two_groups):
    c = operator(client)
    everything = c.get(reverse(GROUPS), {"status": "all"})
    [first, second] = everything.context["groups"]
    assert (first.fingerprint, first.total, first.parked) == (FP, 4, 3)
    assert first.last_failed_at == at(21)
    assert rows(everything.content.decode())[0][2:6] == ["4", "3", "2026-11-01 10:00",
                                                         "2026-11-21 10:00"]
    resolved = c.get(reverse(GROUPS), {"status": "resolved"})
    [only] = resolved.context["groups"]
    assert (only.fingerprint, only.total, only.parked) == (FP, 1, 0)
    assert c.get(reverse(GROUPS), {"status": "discarded"}).context["groups"] == []
    assert "No letters with status discarded" in \
        c.get(reverse(GROUPS), {"status": "discarded"}).content.decode()
    # An unknown status falls back to parked
    assert c.get(reverse(GROUPS), {"status": "bogus"}).context["status"] == "parked"


def test_group_pages_need_the_view_permission(client, two_groups):
    user = get_user_model().objects.create_user("nobody", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(reverse(GROUPS)).status_code == 403
    assert client.get(reverse(GROUP, args=[FP])).status_code == 403


def test_the_change_list_links_to_the_groups_and_filters_by_fingerprint(client, two_groups):
    group, resolved, other = two_groups
    c = operator(client)
    page = c.get(reverse(CHANGELIST)).content.decode()
    assert reverse(GROUPS) in page and "Failure groups" in page
    filtered = c.get(reverse(CHANGELIST), {"fingerprint": FP})
    assert filtered.status_code == 200
    text = filtered.content.decode()
    for letter in (*group, resolved):
        assert reverse("admin:recovery_deadletter_change", args=[letter.pk]) in text
    assert reverse("admin:recovery_deadletter_change", args=[other.pk]) not in text


def test_a_group_page_describes_the_group_and_offers_only_permitted_operations(client, broker,
                                                                              two_groups):
    group, _, _ = two_groups
    c = operator(client, "replay_deadletter", "compensate_deadletter")
    page = c.get(reverse(GROUP, args=[FP]))
    assert page.status_code == 200
    text = page.content.decode()
    assert "4 letters with fingerprint" in text and "1 resolved" in text and "3 parked" in text
    assert "?operation=replay" in text and "?operation=compensate" in text
    assert "?operation=discard" not in text and "?operation=resolve" not in text
    for letter in group:
        assert reverse("admin:recovery_deadletter_change", args=[letter.pk]) in text
    # A group whose task declares no compensation is not offered compensation
    other = c.get(reverse(GROUP, args=[OTHER_FP])).content.decode()
    assert "?operation=replay" in other and "?operation=compensate" not in other
    assert published(broker) == [] and not DeadLetterEvent.objects.exists()


def test_an_unknown_group_or_operation_is_not_found(client, two_groups):
    c = operator(client, "replay_deadletter")
    assert c.get(reverse(GROUP, args=["0" * 40])).status_code == 404
    assert c.get(reverse(GROUP, args=[FP]), {"operation": "explode"}).status_code == 404
    assert c.post(reverse(GROUP, args=[FP]), {"operation": "explode", "post": "yes"}
                  ).status_code == 404


def test_a_confirmation_without_an_operation_changes_nothing(client, broker, two_groups):
    c = operator(client, "replay_deadletter", "discard_deadletter", "resolve_deadletter",
                 "compensate_deadletter")
    before = statuses()
    response = c.post(reverse(GROUP, args=[FP]), {"post": "yes"})
    assert response.status_code in (302, 400, 404)
    assert_nothing_happened(broker, before)


def test_group_replay_asks_first_then_replays_the_whole_group_with_one_message(client, broker,
                                                                              two_groups):
    group, resolved, other = two_groups
    c = operator(client, "replay_deadletter")
    url = reverse(GROUP, args=[FP])
    # The confirmation page
    page = c.get(url, {"operation": "replay"})
    assert page.status_code == 200
    text = page.content.decode()
    assert "Replay 3 parked letters?" in text
    assert 'name="operation" value="replay"' in text and 'name="post" value="yes"' in text
    assert published(broker) == [] and not DeadLetterEvent.objects.exists()
    # Confirmed
    done = c.post(url, {"operation": "replay", "post": "yes", "note": "fixed in 412"})
    assert done.status_code == 302 and done["Location"] == url
    assert messages_of(c.get(url)) == ["3 dead letters were replayed."]
    assert sorted(m["headers"]["id"] for m in published(broker)) == ["t-1", "t-2", "t-3"]
    assert statuses() == {"t-1": "replaying", "t-2": "replaying", "t-3": "replaying",
                          "t-4": "resolved", "t-5": "parked"}
    assert DeadLetterEvent.objects.filter(action="replayed", actor="op",
                                          note="fixed in 412").count() == 3


@pytest.mark.parametrize("operation, codename, status", [
    ("discard", "discard_deadletter", "discarded"),
    ("resolve", "resolve_deadletter", "resolved"),
    ("compensate", "compensate_deadletter", "compensated"),
])
def test_group_discard_resolve_and_compensate_act_on_the_whole_group(client, broker, two_groups,
                                                                     operation, codename, status):
    c = operator(client, codename)
    url = reverse(GROUP, args=[FP])
    assert f"{operation.capitalize()} 3 parked letters?" in \
        c.get(url, {"operation": operation}).content.decode()
    c.post(url, {"operation": operation, "post": "yes"})
    assert messages_of(c.get(url)) == [f"3 dead letters were {status}."]
    assert statuses() == {"t-1": status, "t-2": status, "t-3": status,
                          "t-4": "resolved", "t-5": "parked"}
    assert DeadLetterEvent.objects.filter(action=status).count() == 3
    expected_messages = 3 if operation == "compensate" else 0
    assert len(published(broker)) == expected_messages


@pytest.mark.parametrize("operation", ["replay", "discard", "resolve", "compensate"])
def test_each_group_operation_needs_its_own_permission(client, broker, two_groups, operation):
    others = [codename for op, codename in (("replay", "replay_deadletter"),
                                            ("discard", "discard_deadletter"),
                                            ("resolve", "resolve_deadletter"),
                                            ("compensate", "compensate_deadletter"))
              if op != operation]
    c = operator(client, *others)
    before = statuses()
    url = reverse(GROUP, args=[FP])
    assert c.get(url, {"operation": operation}).status_code == 403
    assert c.post(url, {"operation": operation, "post": "yes"}).status_code == 403
    assert f"?operation={operation}" not in c.get(url).content.decode()
    assert_nothing_happened(broker, before)


# -- too many for one request ---------------------------------------------------------------


def limited(n: int):
    return override_settings(RECOVERY={**settings.RECOVERY, "ADMIN_BULK_MAX": n})


def suggested_command(message: str) -> list[str]:
    return shlex.split(message.split("python manage.py ", 1)[1])


def test_a_bulk_action_over_the_admin_limit_is_refused_with_the_shell_command(client, broker):
    c = operator(client, "replay_deadletter", "discard_deadletter")
    letters = [make(n) for n in range(1, 5)] + [make(5, status=DeadLetter.Status.RESOLVED)]
    before = statuses()
    with limited(3):
        for confirm in (False, True):
            response = post_action(c, "discard_selected", letters, confirm=confirm)
            page = c.get(reverse(CHANGELIST)) if not confirm else response
            [message] = page.context["messages"]
            assert message.level_tag == "error"
            assert "4 letters are more than the admin handles in one request (3)" in str(message)
            assert "python manage.py dlq discard" in str(message)
            assert "You are about to" not in response.content.decode()
            assert_nothing_happened(broker, before)
        # At the limit it goes through (only parked letters count)
        done = post_action(c, "discard_selected", letters[1:], confirm=True)
        assert messages_of(done) == ["3 dead letters were discarded."]


def test_a_group_operation_over_the_admin_limit_is_refused_with_a_command_that_works(client,
                                                                                    broker,
                                                                                    two_groups):
    c = operator(client, "discard_deadletter")
    url = reverse(GROUP, args=[FP])
    before = statuses()
    with limited(2):
        c.post(url, {"operation": "discard", "post": "yes"})
        [message] = c.get(url).context["messages"]
    text = str(message)
    assert message.level_tag == "error"
    assert "3 letters are more than the admin handles in one request (2)" in text
    assert f"python manage.py dlq discard --fingerprint {FP}" in text
    assert_nothing_happened(broker, before)
    # The command it names is one manage.py accepts, and does the job
    out = io.StringIO()
    call_command(*suggested_command(text), "--yes", stdout=out, stderr=io.StringIO())
    assert "Discarded 3 letters" in out.getvalue()
    assert statuses() == {"t-1": "discarded", "t-2": "discarded", "t-3": "discarded",
                          "t-4": "resolved", "t-5": "parked"}


# -- the same failure, seen from one letter -------------------------------------------------


def test_a_letter_page_lists_the_other_letters_with_its_fingerprint(client, two_groups):
    group, resolved, other = two_groups
    c = operator(client)
    page = c.get(reverse("admin:recovery_deadletter_change", args=[group[0].pk]))
    text = page.content.decode()
    assert "Other letters with this fingerprint" in text
    assert "3 other letters (2 parked, 1 resolved)." in text
    for sibling in (group[1], group[2], resolved):
        assert reverse("admin:recovery_deadletter_change", args=[sibling.pk]) in text
        assert sibling.task_id in text
    assert f"{reverse(CHANGELIST)}?fingerprint={FP}" in text
    assert reverse(GROUP, args=[FP]) in text
    # The letter alone in its group
    alone = c.get(reverse("admin:recovery_deadletter_change", args=[other.pk])).content.decode()
    assert "None: this failure happened once." in alone
    # One sibling, in the singular
    DeadLetter.objects.filter(pk__in=[group[2].pk, resolved.pk]).delete()
    one = c.get(reverse("admin:recovery_deadletter_change", args=[group[0].pk])).content.decode()
    assert "1 other letter (1 parked)." in one
