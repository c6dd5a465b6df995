"""A local, fsynced spool for dead letters the database could not take.

The rule is "acknowledge only what is durable": when PostgreSQL is unreachable
at the moment a task must be parked, the letter is written here (temp file,
fsync, atomic rename, fsync of the directory) before the message is
acknowledged, and the workers drain it into the table once the database is
back. A Redis without persistence would not be durable; a local disk is.
Each worker host has its own spool; draining is idempotent (parking is an
upsert on task id), so two workers sharing a directory cannot duplicate rows.

Nothing blocks on one bad input: a record the handler can never write is
quarantined (renamed ``*.bad``, its reason in ``*.error`` beside it), counted by
:meth:`Spool.quarantined` (the ``recovery_spool_quarantined`` gauge) and left for a
human, while the records behind it drain on.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from ..core.names import logger_for

__all__ = ["Spool", "BadRecord"]

logger = logger_for(__name__)


class BadRecord(ValueError):
    """Raised by a drain handler for a record it can never write (not a retryable error)."""


class Spool:
    """A directory of JSON records, one file per record."""

    SUFFIX = ".json"
    QUARANTINE_SUFFIX = ".bad"
    REASON_SUFFIX = ".error"
    #: A temp file this old belongs to no writer in progress: its writer crashed between
    #: write and rename (so it never returned, and its caller never acknowledged the
    #: message). Removing it loses nothing; a writer stalled longer than this gets an
    #: OSError from its rename and does not acknowledge either.
    STALE_TEMP_SECONDS = 600.0

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def put(self, record: dict) -> Path:
        """Write ``record`` durably; returns its path. Raises OSError if the disk refuses."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{self.SUFFIX}"
        final = self.directory / name
        temp = self.directory / f".{name}.tmp"
        data = json.dumps(record, default=str).encode("utf-8")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            # A half-written temp file is nobody's record: the caller gets the error and
            # does not acknowledge the message.
            temp.unlink(missing_ok=True)
            raise
        self._fsync_directory()
        return final

    def paths(self) -> Iterator[Path]:
        if not self.directory.is_dir():
            return iter(())
        return iter(sorted(self.directory.glob(f"*{self.SUFFIX}")))

    def __len__(self) -> int:
        return sum(1 for _ in self.paths())

    def quarantined_paths(self) -> Iterator[Path]:
        """Records set aside as never writable, oldest first; each waits for a human."""
        if not self.directory.is_dir():
            return iter(())
        return iter(sorted(self.directory.glob(f"*{self.QUARANTINE_SUFFIX}")))

    def quarantined(self) -> int:
        """How many records are quarantined (``*.bad``)."""
        return sum(1 for _ in self.quarantined_paths())

    def requeue_quarantined(self) -> int:
        """Put every quarantined record back in line (``*.bad`` -> ``*.json``), once an
        operator has fixed what refused it; returns how many. Its old name keeps its place:
        the next drain takes it first."""
        requeued = 0
        for bad in self.quarantined_paths():
            try:
                os.replace(bad, bad.with_suffix(self.SUFFIX))
            except FileNotFoundError:
                continue  # another operator requeued it
            bad.with_suffix(self.REASON_SUFFIX).unlink(missing_ok=True)
            requeued += 1
        if requeued:
            self._fsync_directory()
        return requeued

    def remove_stale_temporary_files(self, older_than_seconds: float | None = None) -> int:
        """Remove temp files of writers that crashed before their rename; returns how many.

        Such a file was never acknowledged to anyone (see :attr:`STALE_TEMP_SECONDS`), and
        left alone it would sit in the directory forever.
        """
        if not self.directory.is_dir():
            return 0
        limit = self.STALE_TEMP_SECONDS if older_than_seconds is None else older_than_seconds
        cutoff = time.time() - limit
        removed = 0
        for temp in self.directory.glob(f".*{self.SUFFIX}.tmp"):
            try:
                if temp.stat().st_mtime > cutoff:
                    continue
                temp.unlink()
            except FileNotFoundError:
                continue  # its writer renamed it, or another worker removed it
            removed += 1
            logger.warning("recovery spool: removed %s, left by a writer that crashed before "
                           "its rename", temp)
        return removed

    def drain(self, handler: Callable[[dict], None], limit: int | None = None) -> int:
        """Hand each record to ``handler`` oldest first; delete it once handled.

        A handler that raises :class:`BadRecord` says the record can never be written: it
        is quarantined (see :meth:`quarantine`) and the drain goes on with the next one, as
        it does for a file that is not valid JSON. Any other exception means "not now"
        (the database is unreachable): the drain stops there, leaves the record in place
        and re-raises, so an outage costs one attempt per drain, not one per record.
        Returns how many were drained.
        """
        self.remove_stale_temporary_files()
        drained = 0
        for path in self.paths():
            if limit is not None and drained >= limit:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # another worker drained it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another worker is on it
                if not path.exists():
                    continue
                raw = path.read_bytes()
                try:
                    record = json.loads(raw)
                    handler(record)
                except (BadRecord, json.JSONDecodeError, UnicodeDecodeError) as exc:
                    self.quarantine(path, exc)
                    continue
                path.unlink()
                self._fsync_directory()
                drained += 1
            finally:
                os.close(fd)
        return drained

    def quarantine(self, path: Path, reason: BaseException | str) -> Path:
        """Rename ``path`` to ``*.bad``, its reason in ``*.error`` beside it; never delete.

        The record is the only copy of a failed task: a human reads it, and either repairs
        it or renames it back to ``*.json`` once the cause is fixed.
        """
        bad = path.with_suffix(self.QUARANTINE_SUFFIX)
        os.replace(path, bad)
        why = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
        cause = getattr(reason, "__cause__", None)
        if cause is not None and str(cause) not in why:
            why += f"\ncaused by {type(cause).__name__}: {cause}"
        try:
            path.with_suffix(self.REASON_SUFFIX).write_text(why + "\n", "utf-8")
        except OSError:
            logger.warning("recovery spool: could not write the reason beside %s", bad,
                           exc_info=True)
        self._fsync_directory()
        logger.error("recovery spool: quarantined %s as %s; it can never be written (%s). "
                     "The records behind it drain on.", path.name, bad.name, why)
        return bad

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` may write fewer bytes than asked (a signal, a nearly full disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"os.write wrote {written} bytes")
        view = view[written:]
