"""The module paths of 0.1, kept working for one release.

``recovery`` was one flat folder; its modules now live in subpackages by concern
(see docs/architecture.md). Projects name some of them in code and settings
(``recovery.sagas.Saga``, ``recovery.outbox.enqueue``, ``recovery.circuit.guard``,
``"recovery.errors.PermanentError"`` in a policy), so each old name is an alias of the
new module, the very same object, which keeps ``mock.patch`` and ``isinstance``
working. Importing an old name warns once with :class:`MovedModuleWarning`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "MovedModuleWarning", "install"]

MOVED: dict[str, str] = {
    f"recovery.{old}": f"recovery.{package}.{old}"
    for package, modules in {
        "core": ("errors", "kinds", "classification", "backoff", "policy", "fingerprint",
                 "headers", "deepjson", "envelope", "bounds", "redaction"),
        "store": ("parking", "pg_fastpath", "spool", "deliveries", "due", "retention",
                  "export", "deferred", "result_rows", "db_timeouts"),
        "delivery": ("worker", "visibility", "housekeeping", "handback", "presence"),
        "operations": ("replay", "replay_options"),
        "workflows": ("sagas", "saga_secrets", "outbox", "circuit", "degraded",
                      "shared_state"),
        "observe": ("metrics", "escalation", "notify", "sentry", "watchdog",
                    "webhook_signing", "views"),
    }.items()
    for old in modules
}


class MovedModuleWarning(DeprecationWarning):
    """An import used a module path of recovery 0.1; the message names the new one."""


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; the old name goes in the next "
                      "release", MovedModuleWarning, stacklevel=2)
        self.module = importlib.import_module(self.new)
        self.spec = self.module.__spec__
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the real module: give it back.
        module.__spec__ = self.spec
        module.__loader__ = self.spec.loader


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's API
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Answer the old names; idempotent."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
