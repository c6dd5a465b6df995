"""Which metrics backends count recovery's events: ``RECOVERY["METRICS_BACKENDS"]``.

Both exporters listen to the same events (:mod:`recovery.subscriptions` connects them
all); each of their receivers is wrapped in :func:`counted_by`, so turning a backend off
is a setting, read at call time, and never a different table of receivers. A deployment
on AWS without a Prometheus keeps the events in one place (CloudWatch) instead of
counting them twice; one moving from Prometheus to CloudWatch lists both for a while.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from .. import conf

__all__ = ["PROMETHEUS", "CLOUDWATCH_EMF", "KNOWN", "enabled", "counted_by"]

PROMETHEUS = "prometheus"
#: CloudWatch: Embedded Metric Format log lines, or PutMetricData (docs/cloudwatch.md).
CLOUDWATCH_EMF = "cloudwatch-emf"
KNOWN: tuple[str, ...] = (PROMETHEUS, CLOUDWATCH_EMF)

Receiver = TypeVar("Receiver", bound=Callable[..., Any])


def enabled(backend: str) -> bool:
    """Whether ``backend`` is listed in ``RECOVERY["METRICS_BACKENDS"]``.

    A value that is not a list of names (reported by ``recovery.E040``) enables nothing
    but a name it equals, so a typo turns a backend off rather than raising on every event.
    """
    listed = conf.get("METRICS_BACKENDS")
    if isinstance(listed, str):
        return listed == backend
    try:
        return backend in listed
    except TypeError:
        return False


def counted_by(backend: str) -> Callable[[Receiver], Receiver]:
    """Decorate an event receiver of ``backend``: it runs only while the backend is listed.

    The receiver keeps its name and signature (``functools.wraps``), so the checks of
    ``tests/recovery/test_events.py`` still read its parameters.
    """

    def decorate(receiver: Receiver) -> Receiver:
        @functools.wraps(receiver)
        def when_enabled(*args: Any, **kwargs: Any) -> Any:
            if enabled(backend):
                return receiver(*args, **kwargs)
            return None

        return when_enabled  # type: ignore[return-value]

    return decorate
