"""Forms of the operator surface; validation delegates to recovery.operations.replay."""

from __future__ import annotations

import json

from django import forms

from recovery.core import redaction
from recovery.operations import replay as service

from .hostile import has_nul


class ReplayForm(forms.Form):
    """Replay one letter, optionally with an edited payload and another queue."""

    args = forms.CharField(widget=forms.Textarea(attrs={"rows": 6, "cols": 80}),
                           help_text="A JSON list of positional arguments.")
    kwargs = forms.CharField(widget=forms.Textarea(attrs={"rows": 6, "cols": 80}),
                             help_text="A JSON object of keyword arguments.")
    queue = forms.CharField(required=False, help_text="Leave empty for the original queue.")
    note = forms.CharField(required=False, help_text="Why; kept in the audit trail.")
    rerun_effects = forms.BooleanField(
        required=False, label="Run its effects again",
        help_text="Effects this task already committed (self.effect, docs/effects.md) are "
                  "skipped by a replay; tick to run them again (a second charge, a second "
                  "row). Recorded in the audit trail.")

    def __init__(self, *args, letter, can_reveal: bool = True, **kwargs):
        self.letter = letter
        super().__init__(*args, **kwargs)
        # A payload with secrets is shown masked to users who may not reveal them; they
        # can replay it as stored but not edit it (a masked value must never be saved).
        # A saga step's letter is masked by its saga's own secret keys too.
        saga_keys = redaction.saga_secret_keys(letter.headers)
        secrets = redaction.has_secrets(letter.task_name, letter.args, letter.kwargs,
                                        extra_keys=saga_keys)
        shown_args, shown_kwargs = redaction.masked_payload(
            letter.task_name, letter.args, letter.kwargs, extra_keys=saga_keys)
        stored = _editable_text(letter.args, letter.kwargs)
        self.locked = (not can_reveal and secrets) or stored is None
        #: the unlocked form shows the stored secrets: a reveal, for the audit trail
        self.reveals = can_reveal and secrets and stored is not None
        if stored is None:
            # A payload nested deeper than a page can render, or larger than it should hold,
            # is replayed as stored; `dlq export --reveal` has it whole.
            note = (f"The payload is too deep or too large to edit here (over "
                    f"{redaction.MAX_DEPTH} levels or {redaction.SHOWN_MAX_CHARS // 1024} KB); "
                    f"it is replayed as stored.")
            self.initial.update(args=note, kwargs=note)
            help_text = note
        else:
            self.initial.update(args=stored[0], kwargs=stored[1])
            if self.locked:
                self.initial.update(args=json.dumps(shown_args, indent=2),
                                    kwargs=json.dumps(shown_kwargs, indent=2))
            help_text = ("Contains secrets, shown masked; editing needs the reveal-secrets "
                         "permission.")
        if self.locked:
            for name in ("args", "kwargs"):
                self.fields[name].disabled = True
                self.fields[name].help_text = help_text

    def _json(self, name: str):
        text = self.cleaned_data[name]
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc.msg} (line {exc.lineno}, "
                                        f"column {exc.colno}).") from None
        except RecursionError:
            raise forms.ValidationError("Nested too deep to read; replay the stored payload, "
                                        "or edit it from a shell.") from None
        if has_nul(value):
            raise forms.ValidationError("Holds a NUL character (\\u0000), which cannot be "
                                        "stored; remove it.")
        return value

    def clean_args(self):
        if self.locked:
            return self.letter.args
        value = self._json("args")
        if not isinstance(value, list):
            raise forms.ValidationError("args must be a JSON list, e.g. [42, \"EUR\"].")
        return value

    def clean_kwargs(self):
        if self.locked:
            return self.letter.kwargs
        value = self._json("kwargs")
        if not isinstance(value, dict):
            raise forms.ValidationError("kwargs must be a JSON object, e.g. {\"force\": true}.")
        return value

    def clean(self):
        cleaned = super().clean()
        if "args" in cleaned and "kwargs" in cleaned:
            try:
                edited = (cleaned["args"], cleaned["kwargs"]) != (self.letter.args,
                                                                  self.letter.kwargs)
                # Why the letter cannot be replayed at all comes before what its payload lacks.
                service.require_replayable(self.letter, queue=cleaned.get("queue") or None,
                                           edited=edited)
                service.validate_payload(self.letter.task_name, cleaned["args"], cleaned["kwargs"])
            except service.ReplayError as exc:
                raise forms.ValidationError(str(exc)) from None
        return cleaned

    @property
    def edited(self) -> bool:
        return (self.cleaned_data["args"], self.cleaned_data["kwargs"]) != \
            (self.letter.args, self.letter.kwargs)


def _editable_text(args, kwargs) -> tuple[str, str] | None:
    """The payload as the form's JSON text, or None when it is too deep to encode or
    larger than a page should hold (:data:`recovery.core.redaction.SHOWN_MAX_CHARS`)."""
    try:
        text = (json.dumps(args, indent=2), json.dumps(kwargs, indent=2))
    except (RecursionError, TypeError, ValueError):
        return None
    return None if len(text[0]) + len(text[1]) > redaction.SHOWN_MAX_CHARS else text
