"""The tools the architecture tests judge with: reading imports, finding cycles.

A reader that resolved ``from . import x`` to the package, or counted a typing-only
import, would pass or fail the rules for the wrong reasons; these pin what it reads.
"""

from __future__ import annotations

from pathlib import Path

from .graph import shortest_cycle, tangles
from .imports import Import, all_imports, sources


def _imports(tmp_path: Path, files: dict[str, str], extra_modules=()) -> list[Import]:
    """The imports of ``pkg.sub.mod`` in a tree of ``files``."""
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [found for found in all_imports(sources("pkg", root=tmp_path), extra_modules)
            if found.module == "pkg.sub.mod"]


def _read(tmp_path: Path, files: dict[str, str], extra_modules=()) -> list[str]:
    return [str(found) for found in _imports(tmp_path, files, extra_modules)]


def test_from_dot_import_a_name_loads_that_submodule(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/other.py": "",
             "pkg/sub/mod.py": "from . import other\nfrom . import CONSTANT\n"}

    assert _read(tmp_path, files) == ["pkg.sub.mod:1 -> pkg.sub.other", "pkg.sub.mod:2 -> pkg.sub"]


def test_relative_imports_climb_from_the_module_s_package(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/core/__init__.py": "",
             "pkg/core/errors.py": "",
             "pkg/sub/mod.py": "from ..core.errors import Boom\nfrom .. import conf\n"}

    assert _read(tmp_path, files) == ["pkg.sub.mod:1 -> pkg.core.errors", "pkg.sub.mod:2 -> pkg"]


def test_a_name_known_only_as_an_alias_is_read_as_a_module(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "",
             "pkg/sub/mod.py": "from pkg import old\n"}

    assert _read(tmp_path, files, extra_modules={"pkg.old"}) == ["pkg.sub.mod:1 -> pkg.old"]


def test_an_import_in_a_method_names_the_method_and_a_typing_only_import_is_marked(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/mod.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import pkg.typed\nelse:\n    import json\n"
        "class Task:\n    import os\n    def run(self):\n        import pkg.late\n")}

    read = {found.target: (found.function, found.type_checking)
            for found in _imports(tmp_path, files)}

    assert read["pkg.typed"] == (None, True)
    assert read["json"] == (None, False)
    assert read["os"] == (None, False)
    assert read["pkg.late"] == ("Task.run", False)


def test_a_cycle_is_found_with_a_loop_to_follow_and_a_chain_is_not_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}

    assert tangles(graph) == [["a", "b", "c"], ["e"]]
    assert shortest_cycle(graph, "b") == ["b", "c", "a", "b"]
    assert shortest_cycle(graph, "d") == []
