"""Mask secrets in dead-letter payloads wherever a person or an export sees them.

The stored payload keeps the real values (a replay must work); pages, exports
and ``dlq show`` show a mask instead. A key is secret when its name contains
one of ``RECOVERY["SECRET_KEYS"]`` (case-insensitive). Positional arguments are
bound to the task's signature first, so ``charge(card_token)`` called as
``charge("tok_123")`` is masked by its parameter name too.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from . import conf

__all__ = ["MASK", "is_secret_key", "mask", "masked_payload", "has_secrets", "hidden_values",
           "scrub_text", "scrub_strings", "mask_with"]

MASK = "••••••"


def _keys() -> tuple[str, ...]:
    return tuple(k.lower().replace("-", "_") for k in conf.get("SECRET_KEYS"))


def is_secret_key(name: Any) -> bool:
    text = str(name).lower().replace("-", "_")
    return any(key in text for key in _keys())


def mask(value: Any) -> Any:
    """A copy of ``value`` with the values of secret-named keys masked, at any depth."""
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else mask(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask(item) for item in value]
    return value


def _positional_names(task_name: str, count: int, app: Any) -> list[str | None]:
    if app is not None and task_name not in app.tasks and not getattr(app, "_recovery_loaded", False):
        # Outside a worker (admin, manage.py) task modules are imported lazily: load them
        # once, the way a worker does, so positional secrets are masked by name there too.
        from .wiring import import_task_modules

        import_task_modules(app)
        app._recovery_loaded = True
    task = app.tasks.get(task_name) if app is not None else None
    if task is None:
        return [None] * count
    run = getattr(task, "_orig_run", None) or task.run
    try:
        parameters = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):
        return [None] * count
    names: list[str | None] = []
    for index in range(count):
        if index < len(parameters) and parameters[index].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(parameters[index].name)
        else:
            names.append(None)
    return names


def masked_payload(task_name: str, args: list, kwargs: dict, app: Any = None) -> tuple[list, dict]:
    """(args, kwargs) as a person may see them."""
    if app is None:
        from celery import current_app as app  # noqa: N811
    names = _positional_names(task_name, len(args or []), app)
    shown_args = [MASK if name and is_secret_key(name) and arg not in (None, "") else mask(arg)
                  for name, arg in zip(names, args or [])]
    return shown_args, mask(kwargs or {})


def has_secrets(task_name: str, args: list, kwargs: dict, app: Any = None) -> bool:
    return masked_payload(task_name, args, kwargs, app) != (list(args or []), dict(kwargs or {}))


#: Hidden values shorter than this are masked only where a text equals them, not inside text.
_MIN_SUBSTRING_SECRET = 3


def hidden_values(raw: Any, masked: Any) -> list:
    """The values that masking hid in ``raw`` (compared with its ``masked`` copy).

    An exception message or a traceback may quote an argument ("token tok_live_x
    rejected"); whatever leaves the database for a person or a third party (Sentry, a
    webhook, an e-mail) scrubs these values from its text too.
    """
    found: list = []

    def leaves(value: Any) -> None:
        if isinstance(value, Mapping):
            for item in value.values():
                leaves(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                leaves(item)
        elif isinstance(value, bool) or value in (None, "", MASK):
            return
        elif isinstance(value, (str, int, float)):
            found.append(value)

    def walk(raw_value: Any, masked_value: Any) -> None:
        if masked_value == MASK and raw_value != MASK:
            leaves(raw_value)
        elif isinstance(raw_value, Mapping) and isinstance(masked_value, Mapping):
            for key, item in raw_value.items():
                walk(item, masked_value.get(key))
        elif isinstance(raw_value, (list, tuple)) and isinstance(masked_value, (list, tuple)):
            for item, masked_item in zip(raw_value, masked_value):
                walk(item, masked_item)

    walk(raw, masked)
    return found


def scrub_text(text: str, values: Any) -> str:
    """``text`` with each of ``values`` (from :func:`hidden_values`) masked."""
    for secret in values:
        as_text = secret if isinstance(secret, str) else str(secret)
        if text == as_text:
            return MASK
        if len(as_text) >= _MIN_SUBSTRING_SECRET and as_text in text:
            text = text.replace(as_text, MASK)
    return text


def scrub_strings(value: Any, values: Any) -> Any:
    """A copy of JSON-like ``value`` with :func:`scrub_text` applied to every string."""
    if not values:
        return value
    if isinstance(value, str):
        return scrub_text(value, values)
    if isinstance(value, Mapping):
        return {key: scrub_strings(item, values) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_strings(item, values) for item in value]
    return value


#: How deep :func:`mask_with` looks for extra secret keys; a subtree below it is masked whole.
EXTRA_KEYS_MAX_DEPTH = 64


def mask_with(value: Any, extra_keys: Any) -> Any:
    """:func:`mask`, with the names in ``extra_keys`` secret too (a saga's own secret keys,
    matched like ``RECOVERY["SECRET_KEYS"]``: case-insensitive, contained in the name)."""
    extra = tuple(str(key).lower().replace("-", "_") for key in extra_keys or () if key)
    if not extra:
        return mask(value)

    def secret(name: Any) -> bool:
        text = str(name).lower().replace("-", "_")
        return any(key in text for key in extra)

    def walk(item: Any, depth: int) -> Any:
        if isinstance(item, dict):
            if depth >= EXTRA_KEYS_MAX_DEPTH:
                return MASK
            return {k: (MASK if secret(k) and v not in (None, "") else walk(v, depth + 1))
                    for k, v in item.items()}
        if isinstance(item, list):
            if depth >= EXTRA_KEYS_MAX_DEPTH:
                return MASK
            return [walk(element, depth + 1) for element in item]
        return item

    return mask(walk(value, 0))
