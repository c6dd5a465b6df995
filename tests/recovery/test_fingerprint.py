"""recovery.core.fingerprint: the same problem on different data is one fingerprint."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.core.fingerprint import fingerprint, normalise_message

TASK = "tasks.charge_order"
EXC = "tasks.errors.OrderNotFound"
HEX40 = re.compile(r"[0-9a-f]{40}")

order_ids = st.integers(min_value=0, max_value=10**12)
decimal_numbers = st.decimals(min_value=0, max_value=10**6, places=2, allow_nan=False,
                              allow_infinity=False)
hex_digits = "0123456789abcdef"
# A hex id is at least six hex digits with at least one digit in it (a run of the letters
# a-f alone is indistinguishable from a word such as "facade" and is left alone on purpose).
hex_ids = st.text(alphabet=hex_digits, min_size=6, max_size=64).filter(
    lambda s: any(c.isdigit() for c in s)
)
upper_hex_ids = hex_ids.map(str.upper)
prefixed_hex_ids = st.text(alphabet=hex_digits, min_size=1, max_size=16).map(lambda s: "0x" + s)
# Quoted values hold anything but their own quote character.
single_quoted = st.text(st.characters(blacklist_characters="'"), max_size=30)
double_quoted = st.text(st.characters(blacklist_characters='"'), max_size=30)


def fp(message, task=TASK, exc=EXC):
    return fingerprint(task, exc, message)


@settings(max_examples=150, deadline=None)
@given(a=order_ids, b=order_ids)
def test_different_order_ids_give_the_same_fingerprint(a, b):
    assert fp(f"Order {a} not found") == fp(f"Order {b} not found")


@settings(max_examples=100, deadline=None)
@given(a=decimal_numbers, b=decimal_numbers)
def test_different_amounts_give_the_same_fingerprint(a, b):
    assert fp(f"cannot refund {a} EUR: balance too low") == \
        fp(f"cannot refund {b} EUR: balance too low")


@settings(max_examples=150, deadline=None)
@given(a=st.uuids(), b=st.uuids(), upper=st.booleans())
def test_different_uuids_give_the_same_fingerprint(a, b, upper):
    b_text = str(b).upper() if upper else str(b)
    assert fp(f"customer {a} has no card on file") == fp(f"customer {b_text} has no card on file")


def test_a_uuid_is_not_confused_with_numbers():
    a = uuid.UUID("00000000-0000-4000-8000-000000000000")
    b = uuid.UUID("deadbeef-cafe-4bad-9fed-abcdefabcdef")
    assert normalise_message(f"id {a}") == normalise_message(f"id {b}") == "id <uuid>"


@settings(max_examples=200, deadline=None)
@given(a=hex_ids | upper_hex_ids | prefixed_hex_ids, b=hex_ids | upper_hex_ids | prefixed_hex_ids)
def test_different_hex_ids_give_the_same_fingerprint(a, b):
    assert fp(f"document {a} is locked by another worker") == \
        fp(f"document {b} is locked by another worker")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("5f3a9c2e1b4d", "7e1f0a9b3c2d"),  # object ids
        ("1234567", "1a2b3c4"),  # short commit shas: digits only, or mixed
        ("0x7f3a2b1c4d50", "0x7f0000000000"),  # memory addresses
        ("0xdeadbeef", "0x12345678"),
    ],
)
def test_realistic_hex_ids_group_together(a, b):
    assert fp(f"<Session object at {a}> is closed") == fp(f"<Session object at {b}> is closed")


@settings(max_examples=150, deadline=None)
@given(a=single_quoted, b=single_quoted)
def test_different_single_quoted_values_give_the_same_fingerprint(a, b):
    assert fp(f"unknown currency '{a}' for order") == fp(f"unknown currency '{b}' for order")


@settings(max_examples=150, deadline=None)
@given(a=double_quoted, b=double_quoted)
def test_different_double_quoted_values_give_the_same_fingerprint(a, b):
    assert fp(f'duplicate key value violates unique constraint "{a}"') == \
        fp(f'duplicate key value violates unique constraint "{b}"')


@settings(max_examples=100, deadline=None)
@given(order=order_ids, customer=st.uuids(), sku=single_quoted, ref=hex_ids)
def test_a_message_mixing_every_variable_part_normalises_completely(order, customer, sku, ref):
    message = f"order {order} of customer {customer}: sku '{sku}' missing (ref {ref})"
    assert fp(message) == fp("order 1 of customer 00000000-0000-0000-0000-000000000000: "
                             "sku 'x' missing (ref 0a0a0a)")


def test_the_words_of_the_message_still_matter():
    assert fp("Order 12 not found") != fp("Customer 12 not found")
    assert fp("payment declined") != fp("payment timed out")


def test_different_task_names_give_different_fingerprints():
    assert fp("Order 1 not found", task="tasks.charge_order") != \
        fp("Order 1 not found", task="tasks.ship_order")


def test_different_exception_types_give_different_fingerprints():
    assert fp("Order 1 not found", exc="tasks.errors.OrderNotFound") != \
        fp("Order 1 not found", exc="django.core.exceptions.ObjectDoesNotExist")


def test_the_same_failure_always_gives_the_same_fingerprint():
    assert fp("Order 1234 not found") == fp("Order 1234 not found")


@settings(max_examples=200, deadline=None)
@given(task=st.text(), exc=st.text(), message=st.text(st.characters(blacklist_categories=())))
def test_a_fingerprint_is_forty_lowercase_hex_characters(task, exc, message):
    # Any text, lone surrogates from a badly decoded message included, must hash.
    assert HEX40.fullmatch(fingerprint(task, exc, message))


def test_normalising_keeps_the_wording():
    assert normalise_message("Order 1234 not found") == "Order <n> not found"
    assert normalise_message("") == ""
    assert normalise_message("connection refused") == "connection refused"
