"""Effects in the application's own database that happened once per task.

At-least-once delivery runs a task again after a worker crash, a retry or a replay. A
task that writes its effect and records ``(task id, effect name, generation)`` in the
same transaction can tell, on any later run, that the effect is already committed. The
row is the proof; its unique constraint is what makes a second run that races the first
wait, then skip. ``generation`` is 0 unless an operator replays a letter asking for its
effects to run again (``replay(..., rerun_effects=True)``), which gives the replay a new
generation instead of deleting the old proof.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["Effect"]


class Effect(models.Model):
    """One effect of one task, committed with the effect's own writes."""

    task_id = models.CharField(max_length=255)
    name = models.CharField(max_length=200)
    generation = models.PositiveIntegerField(default=0)
    task_name = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name = "effect"
        verbose_name_plural = "effects"
        constraints = [
            models.UniqueConstraint(fields=("task_id", "name", "generation"),
                                    name="recovery_effect_once"),
        ]

    def __str__(self) -> str:
        return f"{self.name} of {self.task_name}[{self.task_id}] (generation {self.generation})"
