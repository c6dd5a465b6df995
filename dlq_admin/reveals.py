"""The audit of reveals: whoever sees a letter's secrets unmasked leaves a ``revealed`` event.

Masking protects a payload only if seeing it unmasked is rare and accountable. Each surface
that shows secrets to a user allowed to see them (the change page with ``?reveal=1``, the
unlocked replay form, ``dlq show --reveal``, ``dlq export --reveal``) calls
:func:`record_reveals` before it shows them, so a reveal whose audit cannot be written does
not happen.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

from recovery.store.export import letter_record
from recovery.models import DeadLetter, DeadLetterEvent, SagaEvent

__all__ = ["record_reveals", "record_saga_reveal", "reveals_anything", "BATCH_SIZE"]

#: events written per INSERT (and letter ids held in memory at once) by an export
BATCH_SIZE = 1000


def record_reveals(letter_ids: Iterable[int], *, actor: str, via: str,
                   batch_size: int = BATCH_SIZE) -> int:
    """Write one ``revealed`` event per letter id (``via`` names the surface, kept as the
    note), ``batch_size`` at a time, consuming ``letter_ids`` lazily; return how many."""
    ids = iter(letter_ids)
    written = 0
    while batch := list(islice(ids, batch_size)):
        DeadLetterEvent.objects.bulk_create([
            DeadLetterEvent(letter_id=pk, action=DeadLetterEvent.Action.REVEALED, actor=actor,
                            note=via)
            for pk in batch])
        written += len(batch)
    return written


def record_saga_reveal(run_id: int, *, actor: str, via: str) -> None:
    """A ``revealed`` event on a saga run's audit trail (its context, results and errors
    were shown unmasked)."""
    SagaEvent.objects.create(run_id=run_id, action=SagaEvent.Action.REVEALED, actor=actor,
                             note=via)


def reveals_anything(letter: DeadLetter) -> bool:
    """Whether showing ``letter`` unmasked shows more than its masked form: the same
    comparison for every surface, whatever the masking rules hide."""
    return (letter_record(letter, reveal=True, events=False)
            != letter_record(letter, reveal=False, events=False))
