"""Secrets are masked for people, never in the stored payload."""

from __future__ import annotations

from celery import Celery

from recovery import redaction

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


def test_unknown_task_still_masks_keyword_names(settings):
    args, kwargs = redaction.masked_payload("gone", ["tok_1"], {"password": "p"}, app=make_app())
    assert args == ["tok_1"] and kwargs == {"password": redaction.MASK}


def test_secret_keys_are_configurable(settings):
    settings.RECOVERY = {**settings.RECOVERY, "SECRET_KEYS": ("iban",)}
    assert redaction.mask({"IBAN": "DE00", "password": "p"}) == {"IBAN": redaction.MASK,
                                                                 "password": "p"}
