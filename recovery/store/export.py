"""Dead letters as JSON lines or CSV, for audits, data requests and archiving
before a purge. Secrets are masked unless the caller asks to reveal them. The same
record goes to a Kafka topic (:mod:`recovery.store.kafka`) and is read back by
:mod:`recovery.store.importing`.

Streams: one letter in memory at a time (plus one chunk of events), whatever
the size of the queryset.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import IO, Any

from django.db.models import QuerySet

from ..core import redaction
from .models import DeadLetter

__all__ = ["letter_record", "records", "encoded", "write_jsonl", "write_csv", "csv_cell",
           "CSV_COLUMNS"]

CHUNK = 500

CSV_COLUMNS = (
    "id", "task_id", "task_name", "status", "kind", "permanent", "reason", "exception_type",
    "exception_message", "attempts", "replay_count", "queue", "worker", "fingerprint",
    "first_failed_at", "last_failed_at", "created_at", "updated_at", "args", "kwargs",
    "headers", "history", "traceback",
)


def letter_record(letter: DeadLetter, *, reveal: bool = False, events: bool = True) -> dict:
    """Everything about one letter as plain JSON-able data (secrets masked unless ``reveal``;
    nesting deeper than ``redaction.MAX_DEPTH`` is cut either way, so it can be written)."""
    data = {field.attname if field.name == "id" else field.name: getattr(letter, field.attname)
            for field in DeadLetter._meta.fields}
    shown = redaction.shown_letter(letter, reveal=reveal)
    for name in ("args", "kwargs", "headers", "raw_body", "exception_message", "traceback",
                 "history"):
        data[name] = getattr(shown, name)
    if events:
        data["events"] = [
            {"at": e.at, "action": e.action, "actor": e.actor, "note": shown.text(e.note),
             "outcome": shown.text(e.outcome), "before": shown.payload(e.before),
             "after": shown.payload(e.after)}
            for e in letter.events.all()
        ]
    return data


def _letters(queryset: QuerySet, events: bool) -> Iterator[DeadLetter]:
    if events:
        queryset = queryset.prefetch_related("events")
    return queryset.iterator(chunk_size=CHUNK)


def records(queryset: QuerySet, *, reveal: bool = False,
            events: bool = True) -> Iterator[dict]:
    """:func:`letter_record` of each letter of ``queryset``, streamed: what every export
    writes (a file, or a Kafka topic: :mod:`recovery.store.kafka`)."""
    for letter in _letters(queryset, events):
        yield letter_record(letter, reveal=reveal, events=events)


def encoded(record: dict) -> str:
    """A record as the JSON text every export writes (times as ISO text, UTF-8 kept)."""
    return json.dumps(record, default=str, ensure_ascii=False)


def write_jsonl(queryset: QuerySet, out: IO[str], *, reveal: bool = False,
                events: bool = True) -> int:
    """One JSON object per line per letter, with its audit trail; returns how many."""
    written = 0
    for record in records(queryset, reveal=reveal, events=events):
        out.write(encoded(record) + "\n")
        written += 1
    return written


#: first characters that make a spreadsheet read a cell as a formula (OWASP CSV injection)
_FORMULA_FIRST = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """``value`` as a CSV cell no spreadsheet runs as a formula.

    Task names, exception text and arguments come from clients: a cell starting with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is prefixed with ``'``, as
    OWASP recommends, so Excel or LibreOffice shows it as text instead of running it.
    """
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_FIRST) else text


def write_csv(queryset: QuerySet, out: IO[str], *, reveal: bool = False) -> int:
    """One row per letter; JSON columns (args, kwargs, headers, history) as JSON text;
    every cell safe to open in a spreadsheet (:func:`csv_cell`)."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    written = 0
    for letter in _letters(queryset, events=False):
        record = letter_record(letter, reveal=reveal, events=False)
        writer.writerow([csv_cell(record[column]) for column in CSV_COLUMNS])
        written += 1
    return written
