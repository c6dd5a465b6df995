"""The layers of ``recovery`` and which may import which (issue 14), as data.

A module's layer is the first name under ``recovery``: ``recovery.store.parking`` is in
``store``, ``recovery.conf`` is ``conf``. Imports point down only, so each layer can be
read, tested and replaced knowing just the layers below it; the composition roots sit on
top and connect everything. One table, read by the tests and mirrored by the diagram in
docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping

PACKAGE = "recovery"

#: What each layer may import besides itself.
MAY_IMPORT: Mapping[str, frozenset[str]] = {
    "conf": frozenset(),
    "events": frozenset(),
    "core": frozenset({"conf"}),
    "store": frozenset({"core", "conf", "events"}),
    "workflows": frozenset({"store", "core", "conf", "events"}),
    "operations": frozenset({"workflows", "store", "core", "conf", "events"}),
    "delivery": frozenset({"workflows", "store", "core", "conf", "events"}),
    "task": frozenset({"workflows", "store", "core", "conf", "events"}),
    "observe": frozenset({"task", "delivery", "operations", "workflows", "store", "core",
                          "conf", "events"}),
}

#: The modules that assemble the layers and may import any of them: Django's and
#: Celery's entry points, the public API and the aliases of moved modules.
COMPOSITION_ROOTS: frozenset[str] = frozenset({
    "recovery",
    "recovery.apps",
    "recovery.checks",
    "recovery.wiring",
    "recovery.subscriptions",
    "recovery.models",
    "recovery.moved",
})

ROOT = "composition root"

#: The project around the library: ``recovery`` is pip-installed into projects that have
#: none of these, so it imports none of them.
PROJECT_PACKAGES: frozenset[str] = frozenset({"dlq_admin", "tasks", "config"})


def layer_of(module: str) -> str | None:
    """The layer of a ``recovery`` module, :data:`ROOT`, or None when it has no place yet."""
    if module in COMPOSITION_ROOTS:
        return ROOT
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1] if parts[1] in MAY_IMPORT else None


def is_ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def may_import(importer: str, target: str) -> bool:
    """Whether ``importer`` (a recovery module) may import ``target`` (a recovery module)."""
    mine, theirs = layer_of(importer), layer_of(target)
    if mine == ROOT:
        return True
    return mine is not None and (theirs == mine or theirs in MAY_IMPORT[mine])
