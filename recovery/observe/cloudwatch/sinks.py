"""Where a flush of counts goes: EMF lines on a logger, or the PutMetricData API.

:class:`LogSink` is the default. CloudWatch Logs extracts the metrics from the lines, so
the process needs no AWS credentials and no network call: the CloudWatch agent, Lambda
or ECS's ``awslogs`` driver ships its standard output already. A line must be the JSON
document alone, so unless the project configured handlers for the logger
(``RECOVERY["CLOUDWATCH"]["LOGGER"]``, ``recovery.emf``), it gets one that writes the
bare message to the process's original standard output: ``sys.__stdout__``, because a
Celery worker replaces ``sys.stdout`` with a proxy that would prefix every line.

:class:`PutMetricDataSink` is for hosts without a log agent. It sends the same sums with
boto3 (credentials from boto3's usual chain), from the buffer's thread, never a task's.
It is one or the other: with both, an agent shipping the lines and the API would count
every event twice.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from .emf import MAX_DATUMS_PER_REQUEST, Key, Unsent, documents, metric_data
from .options import CloudWatchOptions

__all__ = ["LogSink", "PutMetricDataSink", "emf_logger", "sink_for"]


def emf_logger(name: str) -> logging.Logger:
    """The logger EMF lines go to: as the project configured it, or, when it has no
    handler of its own, one writing bare lines to standard output and not propagating
    (a parent's formatter would wrap the JSON in a prefix). The lines are INFO records: a
    logger whose level is not set gets INFO, so a root at WARNING does not silence them."""
    found = logging.getLogger(name)
    if not found.handlers:
        handler = logging.StreamHandler(sys.__stdout__ or sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        found.addHandler(handler)
        found.propagate = False
    if found.level == logging.NOTSET:
        found.setLevel(logging.INFO)
    return found


class LogSink:
    """Writes each EMF document of a flush as one INFO line on the EMF logger."""

    def __init__(self, options: CloudWatchOptions) -> None:
        self.namespace = options.namespace
        self.logger = emf_logger(options.logger)

    def __call__(self, counts: Mapping[Key, float], at: float) -> None:
        for document in documents(counts, self.namespace, int(at * 1000)):
            self.logger.info(json.dumps(document, separators=(",", ":")))


class PutMetricDataSink:
    """Sends a flush with PutMetricData, at most 1000 data a request.

    The client is made on first use, in the thread that flushes: a process forked after
    it was made gets a new sink (:mod:`.receivers` forgets the parent's), never a copy
    of the parent's connections.
    """

    def __init__(self, options: CloudWatchOptions, client: Any = None) -> None:
        self.options = options
        self._client = client

    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "cloudwatch", region_name=self.options.region,
                endpoint_url=self.options.endpoint_url,
                config=Config(connect_timeout=self.options.timeout_seconds,
                              read_timeout=self.options.timeout_seconds,
                              retries={"max_attempts": 3, "mode": "standard"}))
        return self._client

    def __call__(self, counts: Mapping[Key, float], at: float) -> None:
        batches = list(_batches(counts))
        for sent, batch in enumerate(batches):
            try:
                self.client().put_metric_data(Namespace=self.options.namespace,
                                              MetricData=metric_data(batch, at))
            except Exception as exc:
                unsent = {key: amount for later in batches[sent:] for key, amount in later.items()}
                raise Unsent(f"PutMetricData failed: {exc}", unsent) from exc


def _batches(counts: Mapping[Key, float]) -> list[dict[Key, float]]:
    """``counts`` cut so that the data of each part fit in one PutMetricData request."""
    batches: list[dict[Key, float]] = []
    current: dict[Key, float] = {}
    size = 0
    for key, amount in counts.items():
        data = len(key[0].rollups)
        if current and size + data > MAX_DATUMS_PER_REQUEST:
            batches.append(current)
            current, size = {}, 0
        current[key] = amount
        size += data
    if current:
        batches.append(current)
    return batches


def sink_for(options: CloudWatchOptions) -> LogSink | PutMetricDataSink:
    return PutMetricDataSink(options) if options.put_metric_data else LogSink(options)
