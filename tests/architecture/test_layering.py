"""recovery's layers import downwards only (issue 14; the table is tests/architecture/layers.py).

Every import counts, at module level or inside a function, except those under
``if TYPE_CHECKING:``, which never run. An import of a module's old path (recovery.moved)
is judged by the module it loads.
"""

from __future__ import annotations

import pytest

from recovery.moved import MOVED

from .imports import Import
from .layers import MAY_IMPORT, PROJECT_PACKAGES, ROOT, is_ours, layer_of, may_import
from .todo import expect_none


def _loaded(found: Import) -> str:
    return MOVED.get(found.target, found.target)


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_a_layer_imports_only_itself_and_the_layers_below_it(layer, recovery_imports):
    broken = [found for found in recovery_imports
              if layer_of(found.module) == layer and not found.type_checking
              and is_ours(_loaded(found)) and not may_import(found.module, _loaded(found))]

    allowed = ", ".join(sorted(MAY_IMPORT[layer])) or "nothing of recovery's"
    expect_none(broken, f"recovery.{layer} may import {allowed}; these imports break the rule "
                        "(module:line -> target)")


def test_nothing_in_recovery_imports_the_project_around_it(recovery_imports):
    broken = [found for found in recovery_imports if not found.type_checking
              and found.target.split(".")[0] in PROJECT_PACKAGES]

    expect_none(broken, f"recovery is installed into projects without "
                        f"{', '.join(sorted(PROJECT_PACKAGES))}; these imports name them")


def test_every_recovery_module_belongs_to_a_layer_or_is_a_composition_root(recovery_modules):
    homeless = sorted(name for name in recovery_modules if layer_of(name) is None)

    expect_none(homeless, f"put these in a layer's package, or make them {ROOT}s in "
                          "tests/architecture/layers.py, saying why")
