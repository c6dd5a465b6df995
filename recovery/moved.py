"""The module paths of 0.1, kept working for one release.

``recovery`` was one flat folder; its modules now live in subpackages by concern
(see docs/architecture.md). Projects name some of them in code and settings
(``recovery.sagas.Saga``, ``recovery.outbox.enqueue``, ``recovery.circuit.guard``,
``"recovery.errors.PermanentError"`` in a policy), so each old name is an alias of the
new module, the very same object, which keeps ``mock.patch`` and ``isinstance``
working. Importing an old name warns once with :class:`MovedModuleWarning`.

A few names left their module altogether (:data:`MOVED_NAMES`); reading one from the old
module warns the same way and gives the new object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

from django.db import transaction

from .core.names import MovedModuleWarning

__all__ = ["MOVED", "MOVED_NAMES", "MovedModuleWarning", "install"]

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


#: Names of 0.1 that left their module: ``module`` -> {name: where it lives now}.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "recovery.conf": {"default_policy": "recovery.core.policy.default_policy"},
    "recovery.observe.metrics": {
        "DatabaseCollector": "recovery.observe.backlogs.DatabaseCollector",
        "CircuitCollector": "recovery.observe.backlogs.CircuitCollector",
        "on_commit": "recovery.moved.on_commit",
    },
}


def on_commit(func, *args) -> None:  # noqa: ANN001 - 0.1's signature, kept as it was
    """0.1's ``recovery.metrics.on_commit``: call ``func(*args)`` once the current
    transaction commits (at once outside one). Never raises. Metrics now follow events
    (:mod:`recovery.events`), which :func:`recovery.events.send_on_commit` defers."""
    try:
        transaction.on_commit(lambda: func(*args))
    except Exception:  # noqa: BLE001 - as in 0.1: a metric never breaks the caller
        pass


def _answering(module: ModuleType, names: dict[str, str]):  # noqa: ANN202
    def __getattr__(name: str):  # noqa: ANN202, N807 - PEP 562
        new = names.get(name)
        if new is None:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        warnings.warn(f"{module.__name__}.{name} moved to {new}; the old name goes in the "
                      "next release", MovedModuleWarning, stacklevel=2)
        owner, _, attribute = new.rpartition(".")
        return getattr(importlib.import_module(owner), attribute)

    return __getattr__


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
    for name, names in MOVED_NAMES.items():
        module = importlib.import_module(name)
        if "__getattr__" not in vars(module):
            module.__getattr__ = _answering(module, names)
