"""Secrets are masked for people, never in the stored payload."""

from __future__ import annotations

from celery import Celery
import json

import pytest

from recovery.core import deepjson, redaction

_APP = None


def make_app():
    """One app for the module: registering the task twice would warn."""
    global _APP
    if _APP is not None:
        return _APP
    app = Celery("redaction", set_as_current=False)

    @app.task(name="pay")
    def pay(order_id, card_token, amount, options=None):
        return None

    _APP = app
    return app


def test_secret_named_keys_are_masked_at_any_depth_and_others_kept():
    value = {"user": "ada", "Password": "hunter2", "nested": [{"API-Key": "k", "n": 1}],
             "client_secret": "s", "empty_token": ""}
    assert redaction.mask(value) == {
        "user": "ada", "Password": redaction.MASK, "nested": [{"API-Key": redaction.MASK, "n": 1}],
        "client_secret": redaction.MASK, "empty_token": "",
    }
    assert value["Password"] == "hunter2"  # a copy: the original is untouched


def test_positional_arguments_are_masked_by_their_parameter_name():
    args, kwargs = redaction.masked_payload(
        "pay", [42, "tok_live_123", 500, {"authorization": "Bearer x"}], {}, app=make_app())
    assert args == [42, redaction.MASK, 500, {"authorization": redaction.MASK}]
    assert redaction.has_secrets("pay", [42, "tok", 5], {}, app=make_app())
    assert not redaction.has_secrets("pay", [42, "", 5], {}, app=make_app())


def test_an_unknown_task_masks_every_positional_argument_and_keywords_by_name(settings):
    # Stricter than before (args were shown in clear): without the signature, any
    # positional argument may be the secret.
    args, kwargs = redaction.masked_payload("gone", ["tok_1", 5, None, ""],
                                            {"password": "p", "note": "n"}, app=make_app())
    assert args == [redaction.MASK, redaction.MASK, None, ""]
    assert kwargs == {"password": redaction.MASK, "note": "n"}


def test_secret_keys_are_configurable(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SECRET_KEYS": ("iban",)}
    assert redaction.mask({"IBAN": "DE00", "password": "p"}) == {"IBAN": redaction.MASK,
                                                                 "password": "p"}


@pytest.mark.parametrize("name", ["pin", "pin_code", "userPIN", "PIN", "card", "cardNumber",
                                  "credit-card", "IBANCode", "x-auth-key", "pan", "otp_value",
                                  "ssn", "cvv", "cvc2", "pin1", "session_id", "privateKey",
                                  "APIKEY", "client_signature", "oauthToken", "db_passphrase"])
def test_default_secret_keys_mask_these_names(name):
    assert redaction.is_secret_key(name)


@pytest.mark.parametrize("name", ["shipping", "company", "author", "spinach", "panel",
                                  "discard_reason", "opinion", "expand", "cardinality",
                                  "authority", "happiness", "order_id", "amount_cents"])
def test_short_keys_match_whole_words_only(name):
    assert not redaction.is_secret_key(name)


def deep(depth, leaf="leaf"):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_masking_stops_at_the_depth_limit_without_recursing_further():
    masked = redaction.mask({"a": deep(10_000)})
    depth, value = 0, masked["a"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert value == redaction.MASK and depth == redaction.MAX_DEPTH - 1
    assert redaction.hidden_values({"a": deep(10_000)}, masked) == ["leaf"]
    assert redaction.scrub_strings({"a": deep(10_000)}, ["x"])["a"] is not None


def test_has_secrets_of_a_deep_payload_answers():
    assert redaction.has_secrets("pay", [1, "", 5, {"n": deep(5000)}], {}, app=make_app())


def test_deep_json_loads_what_json_loads_cannot():
    leaf = [1500.0, 'x"y\u00e9', True, None, -2]
    text = '{"a": ' + "[" * 5000 + json.dumps(leaf)[1:-1] + "]" * 5000 + ', "b": {}}'
    value = deepjson.loads(text)
    inner = value["a"]
    for _ in range(4999):
        inner = inner[0]
    assert inner == leaf and value["b"] == {}
    assert deepjson.loads('[1, {"k": [2, []]}]') == json.loads('[1, {"k": [2, []]}]')
    with pytest.raises(ValueError):
        deepjson.loads("[" * 5000 + "1,]" + "]" * 4999)


def test_scrub_text_masks_the_longest_secret_first():
    assert redaction.scrub_text("tok_live_abc and tok", ["tok", "tok_live_abc"]) == \
        f"{redaction.MASK} and {redaction.MASK}"


def test_clipped_cuts_long_text_and_names_its_size():
    text = redaction.clipped("x" * (2 * 1048576), limit=10)
    assert text.startswith("x" * 10) and "(2.0 MB, truncated; full value via dlq export --reveal)" in text
    assert redaction.clipped("short") == "short"


class Letter:
    """The attributes redaction reads from a DeadLetter or a ParkRecord."""

    def __init__(self, **fields):
        defaults = dict(task_name="pay", args=[], kwargs={}, headers={}, raw_body="",
                        content_type="application/json", exception_message="", traceback="",
                        history=[])
        self.__dict__.update({**defaults, **fields})


def test_shown_letter_masks_reprs_and_protocol_bodies_by_signature(monkeypatch):
    monkeypatch.setattr(redaction, "current_app", make_app())
    letter = Letter(
        args=[42, "tok_a"], headers={"argsrepr": "(42, 'tok_a')", "kwargsrepr": "{'x': 1}",
                                      "headers": {"cookie": "c=1"}},
        raw_body=json.dumps([[42, "tok_a"], {}, {"chain": [{"task": "pay", "args": [1, "tok_b"]}]}]),
        exception_message="declined tok_a and tok_b",
        history=[{"exception_message": "declined tok_a"}])
    shown = redaction.shown_letter(letter)
    assert shown.headers == {"argsrepr": repr((42, redaction.MASK)), "kwargsrepr": "{'x': 1}",
                             "headers": {"cookie": redaction.MASK}}
    assert json.loads(shown.raw_body)[0] == [42, redaction.MASK]
    assert json.loads(shown.raw_body)[2]["chain"][0]["args"] == [1, redaction.MASK]
    assert shown.exception_message == f"declined {redaction.MASK} and {redaction.MASK}"
    assert shown.history == [{"exception_message": f"declined {redaction.MASK}"}]
    revealed = redaction.shown_letter(letter, reveal=True)
    assert revealed.exception_message == letter.exception_message


def test_an_undecodable_body_is_a_note_unless_revealed():
    letter = Letter(raw_body="\x80\x04secret", content_type="application/x-python-serialize")
    assert redaction.shown_letter(letter).raw_body == (
        "9 bytes, not decodable: hidden because it may hold secrets")  # \x80: 2 bytes
    assert redaction.shown_letter(letter, reveal=True).raw_body == letter.raw_body


def test_scrub_at_storage_uses_known_rules_only(monkeypatch):
    monkeypatch.setattr(redaction, "current_app", make_app())
    known = Letter(args=[7, "tok_c"], exception_message="no tok_c for 7", traceback="tok_c",
                   history=[{"exception_message": "tok_c"}])
    assert redaction.scrubbed_failure(known)[:3] == (
        f"no {redaction.MASK} for 7", redaction.MASK, [{"exception_message": redaction.MASK}])
    unknown = Letter(task_name="gone", args=[1234], exception_message="order 1234")
    assert redaction.scrubbed_failure(unknown)[0] == "order 1234"


def test_short_numbers_are_never_scrubbed_out_of_text():
    # A secret number like a year or a count would rewrite every line number it matches.
    assert redaction.scrub_text('File "x.py", line 250, exp 2027', [250, 2027]) == (
        'File "x.py", line 250, exp 2027')
    assert redaction.scrub_text("pin 48151623 refused", [48151623]) == (
        f"pin {redaction.MASK} refused")
    assert redaction.scrub_text("250", [250]) == redaction.MASK  # the whole text is the secret


def test_text_is_hidden_whole_when_a_payload_hides_too_many_values_to_scrub():
    values = [f"s{i:06}" for i in range(redaction.SCRUB_MAX_VALUES + 1)]
    shown = redaction.scrub_text("quoting s000001 and more", values)
    assert "s000001" not in shown and "hidden" in shown
    assert redaction.scrub_text("quoting s000001", values[:10]) == f"quoting {redaction.MASK}"


def test_a_tasks_parameter_names_are_read_once_not_per_message(monkeypatch):
    # A worker masks every message it receives: inspect.signature per message was most of
    # that cost (bench/profile_worker.py success).
    app = Celery("redaction-signature", set_as_current=False)

    @app.task(name="charge_once", bind=True)
    def charge_once(self, order_id, card_token, *rest):
        return None

    calls = []
    real = redaction.inspect.signature
    monkeypatch.setattr(redaction.inspect, "signature",
                        lambda target: calls.append(target) or real(target))
    for _ in range(3):
        args, _kwargs = redaction.masked_payload("charge_once", [7, "tok", "x"], {}, app=app)
        assert args == [7, redaction.MASK, "x"]
    assert len(calls) == 1
