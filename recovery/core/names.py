"""The names recovery's modules had before they moved into packages, where a name leaves
the process.

Logger names and the dotted path of recovery's own exceptions are read outside the code:
a project's ``LOGGING`` configuration and log-based alerts name ``recovery.sagas``; a
letter's ``exception_type`` feeds its fingerprint, which groups letters and keys the one
open incident and the Sentry issue of a failure. Moving code into ``recovery.workflows``
must not silence an alert nor split a failure group in two, so these keep the 0.1 name:
``recovery.<package>.<module>`` reads ``recovery.<module>``.
"""

from __future__ import annotations

import logging

__all__ = ["PACKAGES", "MovedModuleWarning", "public_module", "logger_for"]

#: recovery's subpackages, whose modules keep their 0.1 (flat) names outside the code
PACKAGES = frozenset({"core", "store", "delivery", "operations", "workflows", "observe"})


class MovedModuleWarning(DeprecationWarning):
    """Code used a module path or name of recovery 0.1; the message names the new one."""


def public_module(module: str) -> str:
    """``recovery.workflows.sagas`` -> ``recovery.sagas``; any other name unchanged."""
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "recovery" and parts[1] in PACKAGES:
        return f"recovery.{parts[2]}"
    return module


def logger_for(module: str) -> logging.Logger:
    """The logger of a recovery module, by its 0.1 name: call with ``__name__``."""
    return logging.getLogger(public_module(module))
