"""Cycles in a directed graph of module names, for the import-cycle test.

Small enough to own rather than depend on: Tarjan's strongly connected components, and
one shortest cycle through a component so that a failure shows a loop a person can
follow, not only a set of names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Set

Graph = Mapping[str, Set[str]]


def tangles(graph: Graph) -> list[list[str]]:
    """The groups of nodes that can each reach the others (more than one node, or one
    node with an edge to itself), each sorted, in the order Tarjan's algorithm finds them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def shortest_cycle(graph: Graph, start: str) -> list[str]:
    """The nodes of a shortest path from ``start`` back to ``start`` (``start`` at both
    ends), or an empty list when there is none."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph.get(node, ())):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    return []
