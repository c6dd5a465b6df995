"""An operator's choice to run a letter's effects again on its next replay.

By default a replay skips every effect its task already committed (``self.effect``): the
replay exists to finish what failed, not to repeat what worked. Sometimes the committed
effect is the problem (a charge written with a wrong amount, undone by hand): the
operator then replays with the effects run again. That is recorded on the letter, as a
new effects generation in its stored headers, so the next replay of it (single or bulk,
from the admin or ``manage.py dlq replay --rerun-effects``) carries it; the old proofs
stay, and the choice is an audit event.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import QuerySet

from ..core import headers as hdr
from ..store.effects import next_generation
from ..store.models import DeadLetter, DeadLetterEvent

__all__ = ["mark_effects_rerun", "mark_all_effects_rerun"]


def mark_effects_rerun(letter: DeadLetter, *, actor: str, note: str = "") -> int:
    """With ``letter`` locked by the caller's transaction: have its next replay run its
    effects again; the generation it will run them as."""
    generation = next_generation(letter.task_id)
    stored = dict(letter.headers) if isinstance(letter.headers, dict) else {}
    carried = stored.get("headers")
    stored["headers"] = {**(carried if isinstance(carried, dict) else {}),
                         hdr.EFFECTS_GENERATION: generation}
    letter.headers = stored
    letter.save(update_fields=["headers", "updated_at"])
    DeadLetterEvent.objects.create(
        letter=letter, action=DeadLetterEvent.Action.EFFECTS_RERUN, actor=actor, note=note,
        after={"effects_generation": generation},
        outcome=f"its next replay runs its effects again (generation {generation})",
    )
    return generation


def mark_all_effects_rerun(letters: QuerySet, *, actor: str, note: str = "") -> int:
    """Mark every parked letter of ``letters`` as :func:`mark_effects_rerun` does, each
    under its own row lock (a letter a concurrent replay took is left alone); how many."""
    marked = 0
    for pk in letters.filter(status=DeadLetter.Status.PARKED).values_list("pk", flat=True):
        with transaction.atomic():
            letter = (DeadLetter.objects.select_for_update(skip_locked=True)
                      .filter(pk=pk, status=DeadLetter.Status.PARKED).first())
            if letter is not None:
                mark_effects_rerun(letter, actor=actor, note=note)
                marked += 1
    return marked
