"""The imports a source tree writes, read from its text rather than by running it.

The architecture tests judge what a module *says* it needs: an import inside a function
that only some code path reaches counts as much as one at the top, and a tree can be
read whether or not Django is set up. Relative imports are resolved, ``from . import x``
names the submodule ``x``, and an import under ``if TYPE_CHECKING:`` is marked, since it
never runs.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Import:
    """One module named by one import statement."""

    module: str
    line: int
    target: str
    function: str | None
    type_checking: bool

    @property
    def at_module_level(self) -> bool:
        """True when importing ``module`` runs this import (not typing-only, not in a function)."""
        return self.function is None and not self.type_checking

    def __str__(self) -> str:
        where = f" (in {self.function})" if self.function else ""
        return f"{self.module}:{self.line} -> {self.target}{where}"


@dataclass(frozen=True)
class Source:
    """A module of the tree: its dotted name and file."""

    name: str
    path: Path

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def sources(*folders: str, root: Path = REPO, skip: Container[str] = ()) -> dict[str, Source]:
    """Every ``.py`` file below ``folders`` of ``root``, by dotted module name.

    ``skip`` names folders (relative to ``root``, like ``recovery/migrations``) or files
    left out.
    """
    found: dict[str, Source] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root)
            if any(str(part) in skip for part in (relative, *relative.parents)):
                continue
            parts = relative.with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = Source(name, path)
    return found


def imports_of(source: Source, is_module: Callable[[str], bool]) -> list[Import]:
    """The imports ``source`` writes, each resolved to the module it loads.

    ``is_module`` says whether a dotted name is a module, which decides what
    ``from package import name`` loads: the submodule ``package.name`` if there is one,
    else ``package`` itself.
    """
    tree = ast.parse(source.path.read_text(), filename=str(source.path))
    visitor = _Visitor(source, is_module)
    visitor.visit(tree)
    return visitor.imports


def all_imports(modules: dict[str, Source], extra_modules: Iterable[str] = ()) -> list[Import]:
    """The imports of every module in ``modules``; ``extra_modules`` are further names
    that ``from package import name`` may load as a module (aliases, for instance)."""
    known = set(modules) | set(extra_modules)
    return [found for source in modules.values() for found in imports_of(source, known.__contains__)]


def ancestors(module: str) -> list[str]:
    """The packages containing ``module``, outermost first: ``a.b.c`` gives ``a``, ``a.b``."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


class _Visitor(ast.NodeVisitor):
    def __init__(self, source: Source, is_module: Callable[[str], bool]) -> None:
        self.source = source
        self.is_module = is_module
        self.scope: list[tuple[str, str]] = []
        self.type_checking = False
        self.imports: list[Import] = []

    def _enter(self, kind: str, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append((kind, node.name))
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._enter("function", node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._enter("function", node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._enter("class", node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self.type_checking = self.type_checking, True
        for child in node.body:
            self.visit(child)
        self.type_checking = outer
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        package = self._absolute(node.module, node.level)
        loaded = {f"{package}.{alias.name}" for alias in node.names
                  if alias.name != "*" and self.is_module(f"{package}.{alias.name}")}
        if len(loaded) < len(node.names):
            loaded.add(package)
        for target in sorted(loaded):
            self._add(node, target)

    def _absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = self.source.name.split(".")
        base = parts if self.source.is_package else parts[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def _add(self, node: ast.stmt, target: str) -> None:
        in_function = any(kind == "function" for kind, _ in self.scope)
        function = ".".join(name for _, name in self.scope) if in_function else None
        self.imports.append(Import(self.source.name, node.lineno, target, function,
                                   self.type_checking))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")

