"""The failure scenario families from the brief, as one enum shared by every module."""

from __future__ import annotations

from enum import Enum


class FailureKind(str, Enum):
    """Which scenario a failure belongs to; stored on dead letters as its value."""

    DEPENDENCY = "dependency"
    DATA_INTEGRITY = "data_integrity"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    TIMEOUT = "timeout"
    POISON = "poison"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value
