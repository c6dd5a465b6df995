"""What a person or a third party sees of a saga run: secrets masked, errors scrubbed.

A run's context (the start arguments merged with what its steps returned), its steps'
results and the errors that quote them are shown in the admin, ``manage.py saga show``,
incidents and Sentry. They are masked by the keys the saga declares
(``Saga(..., secret_keys=(...))``, kept in the run's definition so a web process needs
no saga code) and by ``RECOVERY["SECRET_KEYS"]``; the values masking hid are scrubbed
from error text. The run keeps the real context: the next step and a compensation need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..core import redaction

__all__ = ["secret_keys", "masked", "hidden", "scrub"]


def secret_keys(run: Any) -> tuple[str, ...]:
    """The keys ``run``'s saga declared secret (``run`` is a SagaRun or its definition)."""
    definition = run if isinstance(run, Mapping) else getattr(run, "definition", None)
    keys = (definition or {}).get("secret_keys") if isinstance(definition, Mapping) else None
    return tuple(str(key) for key in keys or () if key)


def masked(run: Any, value: Any) -> Any:
    """``value`` (the context, a step's result) with the saga's and project's secrets masked."""
    return redaction.mask(value, secret_keys(run))


def hidden(run: Any, results: Iterable[Any] = ()) -> list:
    """The secret values of ``run``'s context and of ``results`` (its steps' results)."""
    raw = [getattr(run, "context", None), *results]
    return redaction.hidden_values(raw, masked(run, raw))


def scrub(text: str, values: list) -> str:
    """``text`` (an error) with ``values`` (from :func:`hidden`) masked."""
    return redaction.scrub_text(text or "", values) if values else (text or "")
