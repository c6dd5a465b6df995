"""The CloudWatch Embedded Metric Format specification, as the tests check documents by.

Two independent judges of every document recovery writes:

1. :data:`SCHEMA`, a JSON schema of the specification's document structure
   (https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html),
   plus the rules a JSON schema cannot say: every dimension a directive names is a
   string member of the root, every metric it names a number (or up to 100 numbers).
2. aws-embedded-metrics, AWS's own library: the document is rebuilt as its
   ``MetricsContext`` (whose ``put_metric``/``set_dimensions`` validate names, values,
   units and dimension values), its namespace checked by its validator, and serialized by
   its ``LogSerializer``; the result must be the very same document.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
from aws_embedded_metrics import validator
from aws_embedded_metrics.logger.metrics_context import MetricsContext
from aws_embedded_metrics.serializers.log_serializer import LogSerializer

UNITS = ["Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes",
         "Gigabytes", "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits",
         "Percent", "Count", "Bytes/Second", "Kilobytes/Second", "Megabytes/Second",
         "Gigabytes/Second", "Terabytes/Second", "Bits/Second", "Kilobits/Second",
         "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"]

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "EMF root node",
    "type": "object",
    "required": ["_aws"],
    "properties": {
        "_aws": {
            "title": "Metadata",
            "type": "object",
            "required": ["Timestamp", "CloudWatchMetrics"],
            "properties": {
                # milliseconds since the epoch, an integer
                "Timestamp": {"type": "integer", "minimum": 0},
                "CloudWatchMetrics": {
                    "type": "array",
                    "items": {
                        "title": "MetricDirective",
                        "type": "object",
                        "required": ["Namespace", "Dimensions", "Metrics"],
                        "additionalProperties": False,
                        "properties": {
                            "Namespace": {"type": "string", "minLength": 1, "maxLength": 255},
                            "Dimensions": {
                                "type": "array",
                                "items": {
                                    "title": "DimensionSet",
                                    "type": "array",
                                    "maxItems": 30,
                                    "items": {"type": "string", "minLength": 1,
                                              "maxLength": 250},
                                },
                            },
                            "Metrics": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {
                                    "title": "MetricDefinition",
                                    "type": "object",
                                    "required": ["Name"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "Name": {"type": "string", "minLength": 1,
                                                 "maxLength": 1024},
                                        "Unit": {"enum": UNITS},
                                        "StorageResolution": {"enum": [1, 60]},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

jsonschema.Draft202012Validator.check_schema(SCHEMA)
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_document(document: dict) -> None:
    """Assert that ``document`` (a parsed EMF line) is valid by both judges."""
    errors = sorted(_VALIDATOR.iter_errors(document), key=str)
    assert not errors, "\n".join(error.message for error in errors)
    for directive in document["_aws"]["CloudWatchMetrics"]:
        for dimension_set in directive["Dimensions"]:
            for name in dimension_set:
                value = document.get(name)
                assert isinstance(value, str) and value.strip(), \
                    f"dimension {name!r} is not a non-empty string member of the root: {value!r}"
                assert value.isascii() and len(value) <= 1024, value
        names = [metric["Name"] for metric in directive["Metrics"]]
        assert len(names) == len(set(names)), f"a metric is defined twice: {names}"
        for name in names:
            value = document.get(name)
            if isinstance(value, list):
                assert 0 < len(value) <= 100 and all(map(_is_number, value)), (name, value)
            else:
                assert _is_number(value), f"metric {name!r} is not a number: {value!r}"
    _check_with_aws_embedded_metrics(document)


def _check_with_aws_embedded_metrics(document: dict) -> None:
    (directive,) = document["_aws"]["CloudWatchMetrics"]  # recovery writes one per document
    validator.validate_namespace(directive["Namespace"])
    context = MetricsContext(namespace=directive["Namespace"])
    context.set_dimensions([{name: document[name] for name in dimension_set}
                            for dimension_set in directive["Dimensions"]])
    for metric in directive["Metrics"]:
        context.put_metric(metric["Name"], document[metric["Name"]], metric.get("Unit"))
    context.meta["Timestamp"] = document["_aws"]["Timestamp"]
    (line,) = LogSerializer.serialize(context)
    assert json.loads(line) == document, f"aws-embedded-metrics writes\n{line}\nfor\n{document}"


def emf_lines(text: str) -> list[dict]:
    """The EMF documents among the lines of ``text`` (a log), each checked."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{") or '"_aws"' not in line:
            continue
        document = json.loads(line)
        check_document(document)
        found.append(document)
    return found


def totals(documents: list[dict], metric: str, **dimensions: str) -> float:
    """The sum of ``metric`` over the documents whose dimensions include ``dimensions``."""
    total = 0.0
    for document in documents:
        if metric in document and all(document.get(k) == v for k, v in dimensions.items()):
            value = document[metric]
            total += sum(value) if isinstance(value, list) else value
    return total
