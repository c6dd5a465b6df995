"""The CloudWatch Embedded Metric Format, and PutMetricData's ``MetricData``: pure.

An EMF document is one JSON object on one log line. Its ``_aws`` member says which of
its other members are metrics (``Metrics``), which are dimensions (``Dimensions``: the
sets of dimension names CloudWatch aggregates each metric by), the namespace and the
time; CloudWatch Logs extracts the metrics when the line arrives. The rules this module
keeps (the specification's, tested against a JSON schema of it and against
aws-embedded-metrics' own serializer in tests/recovery/test_cloudwatch_emf.py):

* every dimension and metric a directive names is a member of the document's root;
* a dimension set holds at most 30 names, a directive at most 100 metrics;
* a dimension value is a non-empty ASCII string of at most 1024 characters;
* a metric value is a number (or an array of at most 100 numbers: we send one, the sum
  over the flush interval).

Counts arrive here already summed per series, keyed by :data:`Key`: the metric's
:class:`Family` and its dimension values in the family's order. Series that share their
dimension values and dimension sets share a document (a task's failures, retries and
parked letters are one line), cut so that no directive holds more than 100 metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["Family", "Key", "Unsent", "documents", "metric_data", "dimension_value",
           "valid_namespace", "chunks", "UNIT_COUNT", "MAX_METRICS_PER_DIRECTIVE",
           "MAX_DIMENSIONS_PER_SET", "MAX_DIMENSION_VALUE_CHARS", "MAX_DATUMS_PER_REQUEST",
           "EMPTY_DIMENSION_VALUE"]

UNIT_COUNT = "Count"
MAX_METRICS_PER_DIRECTIVE = 100
MAX_DIMENSIONS_PER_SET = 30
MAX_DIMENSION_VALUE_CHARS = 1024
#: PutMetricData takes at most 1000 metric data in one request (and 1 MB; each of ours
#: is well under 1 KB).
MAX_DATUMS_PER_REQUEST = 1000
#: The value of a dimension whose value is empty: CloudWatch refuses an empty one.
EMPTY_DIMENSION_VALUE = "none"
_NAMESPACE = re.compile(r"^[A-Za-z0-9._#:/-]{1,255}$")


@dataclass(frozen=True)
class Family:
    """One metric name, the dimensions every count of it carries, and the dimension sets
    (``rollups``) CloudWatch keeps a metric for.

    Each dimension set is one more metric per distinct value combination, and CloudWatch
    bills per metric: the sets are few and chosen for a purpose (the full breakdown for
    dashboards, ``Task`` alone for the per-task alarms).

    Attributes:
        name: the CloudWatch metric name.
        dimensions: the dimension names, in the order a :data:`Key` gives their values.
        rollups: the dimension sets, each a subset of ``dimensions``.
        prometheus: the Prometheus series the same events count (docs/cloudwatch.md).
        unit: a CloudWatch unit.
    """

    name: str
    dimensions: tuple[str, ...]
    rollups: tuple[tuple[str, ...], ...]
    prometheus: str = ""
    unit: str = UNIT_COUNT

    def __post_init__(self) -> None:
        if not self.rollups:
            raise ValueError(f"{self.name}: a family needs at least one dimension set")
        for rollup in self.rollups:
            if not rollup or len(rollup) > MAX_DIMENSIONS_PER_SET:
                raise ValueError(f"{self.name}: a dimension set holds 1 to "
                                 f"{MAX_DIMENSIONS_PER_SET} names, not {rollup!r}")
            if not set(rollup) <= set(self.dimensions):
                raise ValueError(f"{self.name}: {rollup!r} names a dimension the family "
                                 f"does not carry ({self.dimensions!r})")
        if self.name in self.dimensions:
            raise ValueError(f"{self.name} is a dimension of itself")


#: A series: its family and its dimension values, in the order of ``family.dimensions``.
Key = tuple[Family, tuple[str, ...]]


class Unsent(Exception):
    """A publisher sent part of a flush: ``counts`` are the series it did not send."""

    def __init__(self, message: str, counts: Mapping[Key, float]) -> None:
        super().__init__(message)
        self.counts = dict(counts)


def valid_namespace(namespace: object) -> bool:
    """A namespace CloudWatch accepts from us: 1-255 of ``A-Z a-z 0-9 . _ # : / -``, and
    not under ``AWS/``, which is AWS's own."""
    return (isinstance(namespace, str) and bool(_NAMESPACE.match(namespace))
            and not namespace.startswith("AWS/"))


def dimension_value(value: Any) -> str:
    """``value`` as CloudWatch takes a dimension value: ASCII (anything else becomes
    ``?``), trimmed, at most 1024 characters, never empty."""
    text = str(value if value is not None else "").encode("ascii", "replace").decode("ascii")
    text = text.strip()[:MAX_DIMENSION_VALUE_CHARS].strip()
    return text or EMPTY_DIMENSION_VALUE


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def documents(counts: Mapping[Key, float], namespace: str, timestamp_ms: int) -> list[dict]:
    """The EMF documents of ``counts``: one per dimension values and sets, 100 metrics
    at most each."""
    groups: dict[tuple, dict[str, Family]] = {}
    values: dict[tuple, dict[str, float]] = {}
    for (family, dimension_values), value in counts.items():
        group = (tuple(zip(family.dimensions, dimension_values)), family.rollups)
        groups.setdefault(group, {})[family.name] = family
        values.setdefault(group, {})[family.name] = value
    found = []
    for group, families in groups.items():
        pairs, rollups = group
        for names in chunks(sorted(families), MAX_METRICS_PER_DIRECTIVE):
            document: dict[str, Any] = dict(pairs)
            document.update({name: _number(values[group][name]) for name in names})
            document["_aws"] = {
                "Timestamp": int(timestamp_ms),
                "CloudWatchMetrics": [{
                    "Namespace": namespace,
                    "Dimensions": [list(rollup) for rollup in rollups],
                    "Metrics": [{"Name": name, "Unit": families[name].unit} for name in names],
                }],
            }
            found.append(document)
    return found


def metric_data(counts: Mapping[Key, float], timestamp: float) -> list[dict]:
    """PutMetricData's ``MetricData`` for ``counts``: one datum per metric and dimension
    set, summed, as CloudWatch would extract them from :func:`documents`."""
    at = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    totals: dict[tuple[Family, tuple[tuple[str, str], ...]], float] = {}
    for (family, dimension_values), value in counts.items():
        named = dict(zip(family.dimensions, dimension_values))
        for rollup in family.rollups:
            key = (family, tuple((name, named[name]) for name in rollup))
            totals[key] = totals.get(key, 0.0) + value
    return [{
        "MetricName": family.name,
        "Dimensions": [{"Name": name, "Value": value} for name, value in pairs],
        "Timestamp": at,
        "Value": float(total),
        "Unit": family.unit,
    } for (family, pairs), total in totals.items()]
