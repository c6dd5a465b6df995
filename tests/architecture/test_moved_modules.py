"""The module paths of 0.1 keep working for one release (recovery.moved), and only
projects use them: nothing of ours does.

This is the one module of ours allowed to name the old paths. Each check runs in a fresh
interpreter (tests/architecture/interpreter.py) so that the warning is not swallowed by
an import an earlier test made.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from recovery.core.errors import exception_path
from recovery.moved import MOVED, MOVED_NAMES, MovedModuleWarning

from .imports import REPO, Source, all_imports, sources
from .interpreter import run_python
from .todo import expect_none

THIS_FILE = str(Path(__file__).resolve().relative_to(REPO))
DOTTED = re.compile(r"[A-Za-z_][\w.]*(:[\w.]+)?")

PROBE_EVERY_OLD_PATH = """
import importlib, json, sys, warnings
from recovery.moved import MOVED, MOVED_NAMES, MovedModuleWarning

report = {}
for old, new in MOVED.items():
    imported_before = old in sys.modules
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    report[old] = {
        "imported_before": imported_before,
        "same_object": module is importlib.import_module(new) and sys.modules[old] is module,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, MovedModuleWarning)],
    }
print(json.dumps(report))
"""

PROBE_STATEMENT = """
import json, warnings
from django.utils.module_loading import import_string
from recovery.moved import MovedModuleWarning

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {statement}
print(json.dumps({{
    "same_object": {name} is import_string({new!r}),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, MovedModuleWarning)],
}}))
"""

#: What projects write, the name it binds, what that must be, and whether it warns.
STATEMENTS = [
    ("from recovery.sagas import Saga", "Saga", "recovery.workflows.sagas.Saga", True),
    ("from recovery.outbox import enqueue", "enqueue", "recovery.workflows.outbox.enqueue", True),
    ("from recovery.circuit import guard", "guard", "recovery.workflows.circuit.guard", True),
    ("from recovery.task import RecoveryTask", "RecoveryTask", "recovery.task.RecoveryTask",
     False),
    ('PermanentError = import_string("recovery.errors.PermanentError")', "PermanentError",
     "recovery.core.errors.PermanentError", True),
]


@pytest.fixture(scope="module")
def old_paths_imported() -> dict[str, dict]:
    return run_python(PROBE_EVERY_OLD_PATH, django=True)


def test_the_moved_module_warning_is_a_deprecation_warning():
    assert issubclass(MovedModuleWarning, DeprecationWarning)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_and_warns(old, old_paths_imported):
    found = old_paths_imported[old]

    assert not found["imported_before"], f"{old} was imported by Django's set-up: by its old path"
    assert found["same_object"], f"{old} is not the very module {MOVED[old]}"
    assert any(MOVED[old] in message for message in found["warnings"]), (
        f"importing {old} gave no MovedModuleWarning naming {MOVED[old]}: {found['warnings']}")


@pytest.mark.parametrize(("statement", "name", "new", "warns"), STATEMENTS,
                         ids=[statement for statement, *_ in STATEMENTS])
def test_what_projects_write_still_imports_the_same_object(statement, name, new, warns):
    found = run_python(PROBE_STATEMENT.format(statement=statement, name=name, new=new),
                       django=True)

    assert found["same_object"], f"{statement!r} did not bind {new}"
    if warns:
        assert found["warnings"], f"{statement!r} gave no MovedModuleWarning"
    else:
        assert found["warnings"] == [], f"{statement!r} did not move, yet warned"


PROBE_MOVED_NAME = """
import importlib, json, warnings
from recovery.moved import MovedModuleWarning

module = importlib.import_module({module!r})
owner, _, attribute = {new!r}.rpartition(".")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    value = getattr(module, {name!r})
print(json.dumps({{
    "same_object": value is getattr(importlib.import_module(owner), attribute),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, MovedModuleWarning)],
}}))
"""

MOVED_NAME_CASES = [(module, name, new) for module, names in MOVED_NAMES.items()
                    for name, new in names.items()]


@pytest.mark.parametrize(("module", "name", "new"), MOVED_NAME_CASES,
                         ids=[f"{module}.{name}" for module, name, _ in MOVED_NAME_CASES])
def test_a_name_that_left_its_module_still_reads_from_it_and_warns(module, name, new):
    found = run_python(PROBE_MOVED_NAME.format(module=module, name=name, new=new), django=True)

    assert found["same_object"], f"{module}.{name} is not {new}"
    assert any(new in message for message in found["warnings"]), found["warnings"]


def test_an_unknown_name_of_a_module_with_moved_names_is_still_an_attribute_error():
    from recovery import conf

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        conf.no_such_name  # noqa: B018


def test_0_1_on_commit_still_defers_to_the_commit(transactional_db):
    from django.db import transaction

    from recovery.moved import on_commit

    called = []
    with transaction.atomic():
        on_commit(called.append, "after")
        assert called == []
    assert called == ["after"]


def test_0_1_exposition_with_the_database_serves_the_database_backlogs_and_warns(db):
    from recovery.observe import metrics

    with pytest.warns(MovedModuleWarning, match=r"backlogs\.exposition\(\)"):
        body, _ = metrics.exposition(database=True)

    assert b'recovery_collector_up{source="database"} 1.0' in body
    assert b"recovery_dead_letters" in body


def _our_sources() -> dict[str, Source]:
    return sources("recovery", "dlq_admin", "tasks", "config", "bench", "tests", skip={THIS_FILE})


#: Names that read like a 0.1 module path but name something else, kept on purpose.
NOT_MODULE_PATHS = {
    "recovery.watchdog": "the watchdog's Celery task name, which routes and beat entries use",
    "recovery.fingerprint": "a Sentry tag on every letter's event",
}


def _is_exception_type(text: str) -> bool:
    """A letter's ``exception_type``: recovery's own exceptions keep their 0.1 path there
    on purpose, so that fingerprints carry on across the upgrade (recovery.core.names)."""
    module, _, name = text.rpartition(".")
    if module not in MOVED:
        return False
    cls = getattr(importlib.import_module(MOVED[module]), name, None)
    return (isinstance(cls, type) and issubclass(cls, BaseException)
            and exception_path(cls) == text)


def _is_logger_name(text: str) -> bool:
    """A module's logger: recovery's loggers keep their 0.1 names on purpose, so that a
    project's LOGGING and log-based alerts carry on (recovery.core.names). Only a bare
    module name whose module really logs under it counts."""
    if text not in MOVED:
        return False
    logger = getattr(importlib.import_module(MOVED[text]), "logger", None)
    return getattr(logger, "name", None) == text


def _names_old_path(text: str) -> bool:
    """A dotted path (``mock.patch``, ``import_string``, a ``task_cls``) into an old module."""
    if text in NOT_MODULE_PATHS or _is_exception_type(text) or _is_logger_name(text):
        return False
    module = re.split(r"[.:]", text, maxsplit=2)
    return bool(DOTTED.fullmatch(text)) and ".".join(module[:2]) in MOVED


def test_none_of_our_code_imports_a_module_by_its_old_path():
    old = [found for found in all_imports(_our_sources(), extra_modules=MOVED)
           if found.target in MOVED]

    expect_none([f"{found}, now {MOVED[found.target]}" for found in old],
                "these imports use a path of 0.1, which goes in the next release")


def test_no_dotted_path_string_in_our_code_names_an_old_module():
    named = [f"{source.name}:{node.lineno} {node.value!r}"
             for source in _our_sources().values()
             for node in ast.walk(ast.parse(source.path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and _names_old_path(node.value)]

    expect_none(named, "these strings load a module by its path of 0.1")
