"""Mask secrets in dead letters wherever a person or a third party sees them.

The stored payload keeps the real values (a replay must work); pages, exports, ``dlq
show``, alerts and Sentry show a mask instead. What a letter shows is decided in one
place, :func:`shown_letter`; every surface calls it.

The rules:

* A key is secret when its name matches one of ``RECOVERY["SECRET_KEYS"]``
  (case-insensitive; ``-``, ``_`` and camelCase word breaks are the same). Keys of
  four characters or fewer (``pin``, ``pan``, ``otp``, ``card``, ``auth``...) match
  whole words of the name only, so ``pin_code`` and ``cardNumber`` are masked and
  ``shipping``, ``company`` and ``author`` are not; longer keys match anywhere.
* Positional arguments are bound to the task's signature, so ``charge(card_token)``
  called as ``charge("tok_123")`` is masked by its parameter name. When the task cannot
  be imported here, every positional argument is masked: without the signature, any
  of them may be the secret.
* Values a mask hid are scrubbed out of text too (exception messages, tracebacks, the
  attempt history, audit notes), since exceptions quote their arguments.
* Nesting deeper than :data:`MAX_DEPTH` is replaced by the mask, so no walk recurses
  without bound (a hostile payload may nest 10,000 deep).
* A message body that cannot be decoded is hidden from whoever may not reveal secrets.
"""

from __future__ import annotations

import ast
import base64
import inspect
import json
import re
from collections.abc import Mapping
from functools import cached_property, lru_cache
from typing import Any

from celery import current_app

from .. import conf
from . import deepjson, headers as hdr
from .task_modules import import_task_modules

__all__ = ["MASK", "MAX_DEPTH", "SHOWN_MAX_CHARS", "is_secret_key", "mask", "masked_payload",
           "has_secrets", "hidden_values", "scrub_text", "scrub_strings",
           "shown_letter", "ShownLetter", "scrubbed_failure", "clipped", "saga_secret_keys",
           "holds_mask"]

MASK = "••••••"

#: Levels of nesting masking walks into; anything deeper is shown as the mask, whole.
MAX_DEPTH = 32

#: Characters of one value (a payload's JSON, a message, a traceback) the admin shows; the
#: rest is cut with a note naming the full size (``dlq export --reveal`` has it all).
SHOWN_MAX_CHARS = 64 * 1024

#: Keys this short match whole words of a name only (``pan`` must not hide ``company``).
_WORD_KEY_MAX_CHARS = 4

_CAMEL_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=64)
def _split_keys(keys: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """(whole-word keys, substring keys), both in the squashed form of :func:`_words`."""
    words, fragments = set(), []
    for key in keys:
        normal = "_".join(_words(str(key)))
        if len(normal) <= _WORD_KEY_MAX_CHARS and "_" not in normal:
            words.add(normal)
        elif normal:
            fragments.append(normal)
    return frozenset(words), tuple(fragments)


def _words(name: str) -> list[str]:
    return [w for w in _NOT_WORD.split(_CAMEL_BREAK.sub("_", name).lower()) if w]


@lru_cache(maxsize=8192)
def _is_secret(name: str, keys: tuple[str, ...]) -> bool:
    words, fragments = _split_keys(keys)
    parts = _words(name)
    if words.intersection(parts):
        return True
    snake = "_".join(parts)
    squashed = snake.replace("_", "")
    return any(f in snake or f.replace("_", "") in squashed for f in fragments)


def is_secret_key(name: Any, extra_keys: tuple[str, ...] = ()) -> bool:
    """Whether a value under the key (or parameter) ``name`` is masked: it matches
    ``RECOVERY["SECRET_KEYS"]`` or ``extra_keys`` (a saga's own secret keys)."""
    return _is_secret(str(name), tuple(conf.get("SECRET_KEYS")) + tuple(extra_keys))


def _mask(value: Any, depth: int, extra: tuple[str, ...] = ()) -> Any:
    if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        return MASK
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(k, extra) and v not in (None, "")
                    else _mask(v, depth + 1, extra))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(item, depth + 1, extra) for item in value]
    return value


def mask(value: Any, extra_keys: Any = ()) -> Any:
    """A copy of ``value`` with the values of secret-named keys masked, at any depth (and
    whatever lies deeper than :data:`MAX_DEPTH` masked whole). ``extra_keys`` are secret
    too, matched by the same rule."""
    return _mask(value, 0, _extra(extra_keys))


def _extra(keys: Any) -> tuple[str, ...]:
    return tuple(str(key) for key in keys or () if key) if isinstance(keys, (list, tuple)) else ()


def saga_secret_keys(options: Any) -> tuple[str, ...]:
    """The secret keys a saga step's message carries in its ``recovery_saga`` header (the
    saga's own ``secret_keys``): its letter is masked by them too. A forged header can
    only mask more, never less: the project's keys always apply."""
    header = hdr.from_options(options, hdr.SAGA)
    return _extra(header.get("secret_keys")) if isinstance(header, Mapping) else ()


def _positional_names(task_name: str, count: int, app: Any) -> list[str | None] | None:
    """The parameter names of the first ``count`` positional arguments, None for one that
    binds to ``*args``; None as a whole when the task cannot be found here."""
    if app is not None and task_name not in app.tasks and not getattr(app, "_recovery_loaded", False):
        # Outside a worker (admin, manage.py) task modules are imported lazily: load them
        # once, the way a worker does, so positional secrets are masked by name there too.
        import_task_modules(app)
        app._recovery_loaded = True
    task = app.tasks.get(task_name) if app is not None else None
    if task is None:
        return None
    run = getattr(task, "_orig_run", None) or task.run
    try:
        positional = _positional_parameters(run)
    except TypeError:  # an unhashable callable: not cached
        positional = _positional_parameters.__wrapped__(run)
    if positional is None:
        return None
    return [positional[index] if index < len(positional) else None for index in range(count)]


@lru_cache(maxsize=1024)
def _positional_parameters(run: Any) -> tuple[str | None, ...] | None:
    """The name of each parameter of ``run`` that a positional argument binds to by name
    (None for ``*args`` and what follows it); None when it has no signature.

    Cached per callable (a bound ``run`` equals the next one of the same task): a worker
    masks every message it receives, and ``inspect.signature`` was most of that cost.
    """
    try:
        parameters = inspect.signature(run).parameters.values()
    except (TypeError, ValueError):
        return None
    return tuple(parameter.name if parameter.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) else None
        for parameter in parameters)


def _hidden(value: Any) -> bool:
    return value not in (None, "")


def masked_payload(task_name: str, args: list, kwargs: dict, app: Any = None, *,
                   mask_unknown: bool = True, extra_keys: Any = ()) -> tuple[list, dict]:
    """(args, kwargs) as a person may see them.

    ``mask_unknown=False`` masks the positional arguments of a task that cannot be found
    by their content only (what the scrub at storage uses: it must not rewrite a
    message for a secret that is only presumed).
    """
    args = list(args) if isinstance(args, (list, tuple)) else []
    extra = _extra(extra_keys)
    names = _positional_names(task_name, len(args), app if app is not None else current_app)
    if names is None and not mask_unknown:
        names = [None] * len(args)
    if names is None:  # an unknown task: any positional argument may be the secret
        shown_args = [MASK if _hidden(arg) else arg for arg in args]
    else:
        shown_args = [MASK if name and is_secret_key(name, extra) and _hidden(arg)
                      else _mask(arg, 1, extra)
                      for name, arg in zip(names, args)]
    return shown_args, _mask(kwargs if isinstance(kwargs, dict) else {}, 0, extra)


def _differs(raw: Any, masked: Any, depth: int = 0) -> bool:
    """Whether masking hid anything in ``raw`` (walks the bounded ``masked`` side only)."""
    if masked == MASK:
        return raw != MASK
    if depth < MAX_DEPTH and isinstance(raw, Mapping) and isinstance(masked, Mapping):
        return any(_differs(raw.get(k), v, depth + 1) for k, v in masked.items())
    if depth < MAX_DEPTH and isinstance(raw, (list, tuple)) and isinstance(masked, (list, tuple)):
        return any(_differs(r, m, depth + 1) for r, m in zip(raw, masked))
    return False


def has_secrets(task_name: str, args: list, kwargs: dict, app: Any = None, *,
                extra_keys: Any = ()) -> bool:
    """Whether masking hides anything in the payload (bounded in depth)."""
    shown_args, shown_kwargs = masked_payload(task_name, args, kwargs, app, extra_keys=extra_keys)
    return _differs(list(args or []), shown_args) or _differs(dict(kwargs or {}), shown_kwargs)


#: Hidden values shorter than this are masked only where a text equals them, not inside text.
_MIN_SUBSTRING_SECRET = 3
#: Hidden numbers shorter than this are never masked inside text: a year, a count or a
#: line number in a traceback would be rewritten everywhere.
_MIN_SUBSTRING_NUMBER = 6
#: Most distinct values one text is scrubbed of. A payload hiding more is hostile (or
#: unusual): its text is hidden whole, never scrubbed for minutes nor shown unscrubbed.
SCRUB_MAX_VALUES = 1000


def _leaves(value: Any) -> list:
    """The scalar values anywhere in ``value``, walked without recursion (any depth)."""
    found: list = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, bool) or item in (None, "", MASK):
            continue
        elif isinstance(item, (str, int, float)):
            found.append(item)
    return found


def holds_mask(value: Any) -> bool:
    """Whether the mask stands anywhere in ``value`` (walked without recursion, any depth).

    A letter imported from a masked export holds the mask where its secrets were: such a
    payload must never be published as if the mask were the value.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if MASK in item:
                return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def hidden_values(raw: Any, masked: Any) -> list:
    """The values that masking hid in ``raw`` (compared with its ``masked`` copy).

    An exception message or a traceback may quote an argument ("token tok_live_x
    rejected"); whatever leaves the database for a person or a third party (Sentry, a
    webhook, an e-mail) scrubs these values from its text too.
    """
    found: list = []

    def walk(raw_value: Any, masked_value: Any, depth: int) -> None:
        if masked_value == MASK and raw_value != MASK:
            found.extend(_leaves(raw_value))
        elif depth >= MAX_DEPTH:
            return
        elif isinstance(raw_value, Mapping) and isinstance(masked_value, Mapping):
            for key, item in raw_value.items():
                walk(item, masked_value.get(key), depth + 1)
        elif isinstance(raw_value, (list, tuple)) and isinstance(masked_value, (list, tuple)):
            for item, masked_item in zip(raw_value, masked_value):
                walk(item, masked_item, depth + 1)

    walk(raw, masked, 0)
    return found


def scrub_text(text: str, values: Any) -> str:
    """``text`` with each of ``values`` (from :func:`hidden_values`) masked; the longest
    first, so a secret that contains a shorter one is masked whole."""
    if not text or not values:
        return text
    whole, inside = set(), set()
    for value in values:
        secret = value if isinstance(value, str) else str(value)
        whole.add(secret)
        if len(secret) >= (_MIN_SUBSTRING_SECRET if isinstance(value, str)
                           else _MIN_SUBSTRING_NUMBER):
            inside.add(secret)
    if text in whole:
        return MASK
    if len(inside) > SCRUB_MAX_VALUES:
        return (f"[{len(text)} characters hidden: the payload hides more than "
                f"{SCRUB_MAX_VALUES} values to scrub from it]")
    for secret in sorted(inside, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_strings(value: Any, values: Any, _depth: int = 0) -> Any:
    """A copy of JSON-like ``value`` with :func:`scrub_text` applied to every string
    (nesting deeper than :data:`MAX_DEPTH` masked whole)."""
    if not values:
        return value
    if isinstance(value, str):
        return scrub_text(value, values)
    if isinstance(value, (Mapping, list, tuple)) and _depth >= MAX_DEPTH:
        return MASK
    if isinstance(value, Mapping):
        return {key: scrub_strings(item, values, _depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_strings(item, values, _depth + 1) for item in value]
    return value


def clipped(text: str, limit: int = SHOWN_MAX_CHARS) -> str:
    """``text`` cut to ``limit`` characters for a page, saying how much there was."""
    if len(text) <= limit:
        return text
    size = len(text.encode("utf-8", "surrogatepass"))
    human = f"{size / 1048576:.1f} MB" if size >= 1048576 else f"{size / 1024:.0f} KB"
    return text[:limit] + f"… ({human}, truncated; full value via dlq export --reveal)"


# -- what a letter shows -------------------------------------------------------------------


def _repr_value(text: Any) -> Any:
    """The value a Celery ``argsrepr``/``kwargsrepr`` header spells, when it is a literal."""
    if not isinstance(text, str) or len(text) > SHOWN_MAX_CHARS * 16:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


class _Envelope:
    """Masks a Celery message's own fields (headers, a protocol 1 body, a request dict) by
    the task's signature, and remembers what it hid."""

    def __init__(self, task_name: str, args: list, kwargs: dict, mask_unknown: bool = True,
                 extra_keys: tuple[str, ...] = ()) -> None:
        self.task_name = task_name
        self.mask_unknown = mask_unknown
        self.extra_keys = extra_keys
        self.args, self.kwargs = args, kwargs
        self.hidden: list = []

    def payload(self, args: Any, kwargs: Any, task_name: str = "") -> tuple[list, dict]:
        raw_args = list(args) if isinstance(args, (list, tuple)) else []
        raw_kwargs = kwargs if isinstance(kwargs, dict) else {}
        shown_args, shown_kwargs = masked_payload(task_name or self.task_name, raw_args,
                                                  raw_kwargs, mask_unknown=self.mask_unknown,
                                                  extra_keys=self.extra_keys)
        self.hidden += hidden_values(raw_args, shown_args) + hidden_values(raw_kwargs, shown_kwargs)
        return shown_args, shown_kwargs

    def fields(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, (Mapping, list, tuple)) and depth >= MAX_DEPTH:
            self.hidden += _leaves(value)
            return MASK
        if isinstance(value, (list, tuple)):  # e.g. a chain: signatures with their own args
            return [self.fields(item, depth + 1) for item in value]
        if not isinstance(value, Mapping):
            return value
        # A signature or a protocol 1 body names its own task; bind its args to that one.
        task = value.get("task") if isinstance(value.get("task"), str) else ""
        shown: dict = {}
        for key, item in value.items():
            if key in ("argsrepr", "kwargsrepr"):
                literal = _repr_value(item)
                if key == "argsrepr":
                    args = literal if isinstance(literal, (list, tuple)) else value.get("args", self.args)
                    shown[key] = repr(tuple(self.payload(args, {}, task)[0]))
                else:
                    kwargs = literal if isinstance(literal, dict) else value.get("kwargs", self.kwargs)
                    shown[key] = repr(self.payload([], kwargs, task)[1])
                if isinstance(item, str) and literal is None:
                    self.hidden.append(item)  # unreadable: hidden whole
            elif key == "args" and isinstance(item, (list, tuple)):
                shown[key] = self.payload(item, {}, task)[0]
            elif key == "kwargs" and isinstance(item, dict):
                shown[key] = self.payload([], item, task)[1]
            elif is_secret_key(key, self.extra_keys) and _hidden(item):
                self.hidden += _leaves(item) or [item]
                shown[key] = MASK
            else:
                shown[key] = self.fields(item, depth + 1)
        return shown


def _undecodable_note(raw_body: str) -> str:
    size = len(raw_body.encode("utf-8", "surrogatepass"))
    if raw_body.startswith("base64:"):
        try:
            size = len(base64.b64decode(raw_body[len("base64:"):]))
        except ValueError:
            pass
    return f"{size} bytes, not decodable: hidden because it may hold secrets"


class ShownLetter:
    """A letter (a ``DeadLetter`` or a ``ParkRecord``) as a person may see it.

    Every attribute is computed on first use, so a surface that shows only the message
    does not decode the body. With ``reveal`` the values are the stored ones (bounded in
    depth, so they can be rendered); without it, masked as the module docstring says.
    """

    def __init__(self, letter: Any, reveal: bool = False, mask_unknown: bool = True) -> None:
        self.letter = letter
        self.reveal = reveal
        self.mask_unknown = mask_unknown
        self.extra_keys = saga_secret_keys(getattr(letter, "headers", None))

    @cached_property
    def _payload(self) -> tuple[list, dict, list]:
        letter = self.letter
        raw_args = letter.args if isinstance(letter.args, list) else []
        raw_kwargs = letter.kwargs if isinstance(letter.kwargs, dict) else {}
        if self.reveal:
            return _bounded(raw_args), _bounded(raw_kwargs), []
        args, kwargs = masked_payload(letter.task_name, raw_args, raw_kwargs,
                                      mask_unknown=self.mask_unknown, extra_keys=self.extra_keys)
        return args, kwargs, hidden_values(raw_args, args) + hidden_values(raw_kwargs, kwargs)

    @property
    def args(self) -> list:
        return self._payload[0]

    @property
    def kwargs(self) -> dict:
        return self._payload[1]

    def _envelope(self) -> _Envelope:
        letter = self.letter
        return _Envelope(letter.task_name, letter.args if isinstance(letter.args, list) else [],
                         letter.kwargs if isinstance(letter.kwargs, dict) else {},
                         self.mask_unknown, self.extra_keys)

    @cached_property
    def _headers(self) -> tuple[Any, list]:
        if self.reveal:
            return _bounded(self.letter.headers), []
        envelope = self._envelope()
        return envelope.fields(self.letter.headers or {}), envelope.hidden

    @property
    def headers(self) -> Any:
        # A retry's recovery_history quotes exception text: scrub it like the message.
        return scrub_strings(self._headers[0], self.hidden)

    @cached_property
    def _raw_body(self) -> tuple[str, list]:
        raw = self.letter.raw_body or ""
        if not raw or self.reveal:
            return raw, []
        content_type = (getattr(self.letter, "content_type", "") or "").lower()
        body: Any = None
        if not raw.startswith("base64:") and (not content_type or "json" in content_type):
            try:
                body = deepjson.loads(raw)
            except ValueError:
                body = None
        if body is None and raw.strip() != "null":
            return _undecodable_note(raw), [raw]
        envelope = self._envelope()
        if (isinstance(body, list) and len(body) == 3 and isinstance(body[0], list)
                and isinstance(body[1], dict)):  # protocol 2: [args, kwargs, embed]
            args, kwargs = envelope.payload(body[0], body[1])
            shown: Any = [args, kwargs, envelope.fields(body[2], 1)]
        else:  # protocol 1 ({"task", "args", "kwargs", ...}) or any other JSON
            shown = envelope.fields(body)
        return json.dumps(shown, ensure_ascii=False, default=str), envelope.hidden

    @property
    def raw_body(self) -> str:
        return self.text(self._raw_body[0])

    @cached_property
    def hidden(self) -> list:
        """Every value the masks hid: what is scrubbed out of the letter's text."""
        if self.reveal:
            return []
        return self._payload[2] + self._headers[1] + self._raw_body[1]

    def text(self, value: str) -> str:
        """Any text about the letter (an audit note, an outcome) with the hidden values
        scrubbed out."""
        return value if self.reveal else scrub_text(value or "", self.hidden)

    @property
    def exception_message(self) -> str:
        return self.text(self.letter.exception_message or "")

    @property
    def traceback(self) -> str:
        return self.text(self.letter.traceback or "")

    @property
    def history(self) -> list:
        history = self.letter.history if isinstance(self.letter.history, list) else []
        if self.reveal:
            return _bounded(history)
        shown = mask(history, self.extra_keys)
        return scrub_strings(shown, self.hidden) if self.hidden else shown

    def payload(self, payload: Any) -> Any:
        """An audit event's ``before``/``after`` payload ({"args", "kwargs"}) as shown."""
        if not isinstance(payload, dict):
            return payload
        if self.reveal:
            return _bounded(payload)
        args, kwargs = masked_payload(self.letter.task_name, payload.get("args") or [],
                                      payload.get("kwargs") or {}, extra_keys=self.extra_keys)
        return {"args": args, "kwargs": kwargs}


def _bounded(value: Any, depth: int = 0) -> Any:
    """``value`` with nesting deeper than :data:`MAX_DEPTH` replaced by a note (revealed
    values must still render)."""
    if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        return f"… nested deeper than {MAX_DEPTH} levels: not shown"
    if isinstance(value, dict):
        return {k: _bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_bounded(v, depth + 1) for v in value]
    return value


def shown_letter(letter: Any, reveal: bool = False) -> ShownLetter:
    """What ``letter`` shows a person (``reveal`` only for users who may reveal secrets).

    Every surface calls this: admin pages, failure groups, the dashboard, ``manage.py
    dlq``, exports and the escalation payloads.
    """
    return ShownLetter(letter, reveal)


def scrubbed_failure(record: Any) -> tuple[str, str, list, Any]:
    """(exception message, traceback, history, headers) of a letter about to be stored, with the
    values its masks hide scrubbed out: every surface, search and the fingerprint then
    never see them. The payload itself is stored as is (a replay needs it). Only what
    the rules know is secret is scrubbed: the positional arguments of a task that cannot
    be imported are masked on display, not scrubbed from the stored text."""
    shown = ShownLetter(record, mask_unknown=False)
    if not shown.hidden:
        return (record.exception_message or "", record.traceback or "", record.history,
                record.headers)
    history = record.history if isinstance(record.history, list) else []
    return (shown.exception_message, shown.traceback, scrub_strings(history, shown.hidden),
            _scrubbed_history_header(record.headers, shown.hidden))


def _scrubbed_history_header(options: Any, values: list) -> Any:
    """``options`` with the exception text in its ``recovery_history`` header (a poison
    letter keeps the retried message's headers) scrubbed. The rest stays as it came:
    ``argsrepr`` may be all a revealing operator has of an undecodable body."""
    if not isinstance(options, Mapping):
        return options
    scrubbed = dict(options)
    if hdr.HISTORY in scrubbed:
        scrubbed[hdr.HISTORY] = scrub_strings(scrubbed[hdr.HISTORY], values)
    nested = scrubbed.get("headers")
    if isinstance(nested, Mapping) and hdr.HISTORY in nested:
        scrubbed["headers"] = {**nested, hdr.HISTORY: scrub_strings(nested[hdr.HISTORY], values)}
    return scrubbed
