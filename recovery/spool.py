"""A local, fsynced spool for dead letters the database could not take.

The rule is "acknowledge only what is durable": when PostgreSQL is unreachable
at the moment a task must be parked, the letter is written here (temp file,
fsync, atomic rename, fsync of the directory) before the message is
acknowledged, and the workers drain it into the table once the database is
back. A Redis without persistence would not be durable; a local disk is.
Each worker host has its own spool; draining is idempotent (parking is an
upsert on task id), so two workers sharing a directory cannot duplicate rows.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["Spool", "BadRecord"]

logger = logging.getLogger(__name__)


class BadRecord(ValueError):
    """Raised by a drain handler for a record it can never write (not a retryable error)."""


class Spool:
    """A directory of JSON records, one file per record."""

    SUFFIX = ".json"

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
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        self._fsync_directory()
        return final

    def paths(self) -> Iterator[Path]:
        if not self.directory.is_dir():
            return iter(())
        return iter(sorted(self.directory.glob(f"*{self.SUFFIX}")))

    def __len__(self) -> int:
        return sum(1 for _ in self.paths())

    def drain(self, handler: Callable[[dict], None], limit: int | None = None) -> int:
        """Hand each record to ``handler`` oldest first; delete it once handled.

        Stops at the first record whose handler raises (the database is probably
        still down) and leaves it in place. A file that is not valid JSON, or that the
        handler rejects with :class:`BadRecord`, is renamed ``*.bad`` and reported, never
        deleted, so it cannot block the records behind it. Returns how many were drained.
        """
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
                    bad = path.with_suffix(".bad")
                    os.replace(path, bad)
                    logger.error("recovery spool: %s cannot be drained (%s); kept as %s",
                                 path, exc, bad)
                    continue
                path.unlink()
                self._fsync_directory()
                drained += 1
            finally:
                os.close(fd)
        return drained

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
