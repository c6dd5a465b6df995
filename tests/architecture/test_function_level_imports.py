"""No import is written inside a function in recovery/ (issue 14), but the allowed ones.

An import inside a function dodges a circle that an event should have broken, hides a
dependency from the reader of the module's head and from the layering test's reader of
intent, and runs on a task's hot path. The standard library counts too: none of its
modules needs to wait. Migrations are not read (tests/architecture/conftest.py).
"""

from __future__ import annotations

from .imports import Import
from .todo import expect_none

#: Third-party packages imported where they are used, by top-level name.
THIRD_PARTY: dict[str, str] = {
    "sentry_sdk": "an optional extra: a project without Sentry must still import recovery",
    "prometheus_client": "reads PROMETHEUS_MULTIPROC_DIR when imported; the worker sets it "
                         "first (recovery.wiring's worker_init)",
    "redis": "an optional extra: the shared state may live in the database instead",
    "django_celery_results": "optional: only its result backend needs the fast path",
    "boto3": "an optional extra (cloudwatch): only the PutMetricData publisher needs it",
    "botocore": "comes with boto3, for the PutMetricData client's timeouts",
    "confluent_kafka": "an optional extra: only `dlq export --to kafka://` and `dlq import "
                       "--from kafka://` need it (recovery.store.kafka)",
}

#: Functions whose imports are the point of the function, by (module, qualified name).
FUNCTIONS: dict[tuple[str, str], str] = {
    ("recovery.apps", "RecoveryConfig.ready"): "Django's documented place to import signal "
                                               "receivers and system checks",
}


def _allowed(found: Import) -> bool:
    return (found.target.split(".")[0] in THIRD_PARTY
            or (found.module, found.function) in FUNCTIONS)


def _in_functions(recovery_imports: list[Import]) -> list[Import]:
    return [found for found in recovery_imports if found.function is not None]


def test_no_import_is_written_inside_a_function_but_the_allowed_ones(recovery_imports):
    written = _in_functions(recovery_imports)
    broken = [found for found in written if not _allowed(found)]

    print(f"function-level imports in recovery/: {len(written)}, "
          f"{len(written) - len(broken)} allowed, {len(broken)} to move")
    expect_none(broken, "import these at the module's head, send an event instead, or allow "
                        "them in this test with a reason (module:line -> target)")


def test_every_allowed_function_level_import_is_still_written(recovery_imports):
    written = _in_functions(recovery_imports)
    packages = {found.target.split(".")[0] for found in written}
    functions = {(found.module, found.function) for found in written}

    stale = sorted([*(f"package {name}" for name in THIRD_PARTY if name not in packages),
                    *(f"function {module}:{function}" for module, function in FUNCTIONS
                      if (module, function) not in functions)])
    expect_none(stale, "no function-level import uses these allowances any more: remove them")
