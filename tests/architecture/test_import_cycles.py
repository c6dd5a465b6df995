"""No two recovery modules need each other at import time (issue 14).

A cycle of module-level imports works or breaks by which module happens to be imported
first, and is what function-level imports were written to dodge. The graph has an edge
from a module to each recovery module its module-level imports load, and to the packages
containing that module (importing ``recovery.core.errors`` runs ``recovery/core/__init__``),
but not to the importer's own packages: Python runs those before the importer anyway.
"""

from __future__ import annotations

from collections import defaultdict

from recovery.moved import MOVED

from .graph import shortest_cycle, tangles
from .imports import Import, ancestors
from .todo import expect_none


def _edges(recovery_imports: list[Import], modules: set[str]) -> dict[tuple[str, str], Import]:
    """Each edge of the module-level graph, with the import statement that makes it."""
    edges: dict[tuple[str, str], Import] = {}
    for found in recovery_imports:
        if not found.at_module_level:
            continue
        loaded = MOVED.get(found.target, found.target)
        own = set(ancestors(found.module))
        for target in (*ancestors(loaded), loaded):
            if target in modules and target not in own and target != found.module:
                edges.setdefault((found.module, target), found)
    return edges


def test_no_recovery_modules_import_each_other_in_a_cycle(recovery_imports, recovery_modules):
    edges = _edges(recovery_imports, set(recovery_modules))
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, target in edges:
        graph[importer].add(target)

    cycles = []
    for tangle in tangles(graph):
        loop = " -> ".join(shortest_cycle(graph, tangle[0]))
        inside = sorted(str(found) for (importer, target), found in edges.items()
                        if importer in tangle and target in tangle)
        cycles.append("\n    ".join([f"{loop}; the imports among {len(tangle)} modules:",
                                     *inside]))
    expect_none(cycles, "module-level import cycles; break each by an event or by moving "
                        "code down a layer")
