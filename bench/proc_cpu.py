"""CPU seconds of a process tree, read from /proc while the processes still run.

Why /proc and not ``wait4``: the worker's CPU must be read the moment its last task is done,
before the SIGTERM shutdown adds its own cost; /proc/<pid>/stat gives the worker's
utime+stime, the cutime+cstime of pool children it has already reaped (a child replaced after
max-tasks-per-child), and each live child's own counters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/<pid>/stat the CPU figures need, times in clock ticks."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        """Own CPU plus that of reaped children."""
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> Stat:
    """Parse one /proc/<pid>/stat line.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself,
    so the fields are counted from the last ")".
    """
    pid = int(text.split(" ", 1)[0])
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return Stat(pid=pid, ppid=int(rest[1]), utime=int(rest[11]), stime=int(rest[12]),
                cutime=int(rest[13]), cstime=int(rest[14]))


def read_stat(pid: int, proc: Path = Path("/proc")) -> Stat | None:
    """The stat of ``pid``, or None if it has gone."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def children(pid: int, proc: Path = Path("/proc")) -> list[Stat]:
    """The live direct children of ``pid`` (the prefork pool's processes)."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name), proc)
            if stat is not None and stat.ppid == pid:
                found.append(stat)
    return found


def tree_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds of ``pid``, its reaped children and its live children, so far."""
    own = read_stat(pid, proc)
    if own is None:
        raise ProcessLookupError(f"process {pid} is not running: its CPU cannot be read")
    return (own.ticks + sum(child.ticks for child in children(pid, proc))) / TICKS
