"""``RECOVERY["CLOUDWATCH"]`` merged over its defaults, as one immutable value.

Validated here once, with plain messages naming the key, so that the system check
(``recovery.E041``) and the receivers read the same rules: a bad value fails
``manage.py check`` at start-up, and a receiver meeting one anyway sends nothing and
says so once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ... import conf
from .emf import valid_namespace

__all__ = ["CloudWatchOptions", "current"]


def _seconds(key: str, value: Any, *, zero_allowed: bool) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or value < 0 or (value == 0 and not zero_allowed)):
        wanted = "a number of seconds >= 0" if zero_allowed else "a positive number of seconds"
        raise ValueError(f"{key} must be {wanted}, not {value!r}")
    return float(value)


def _optional_text(key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{key} must be a non-empty string or None, not {value!r}")
    return value


@dataclass(frozen=True)
class CloudWatchOptions:
    """How the CloudWatch backend sends; each field is the key of the same name in
    ``RECOVERY["CLOUDWATCH"]`` (docs/settings.md)."""

    namespace: str = "CeleryRecovery"
    logger: str = "recovery.emf"
    flush_interval_seconds: float = 10.0
    max_buffered_series: int = 1000
    put_metric_data: bool = False
    region: str | None = None
    endpoint_url: str | None = None
    timeout_seconds: float = 5.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CloudWatchOptions":
        """Raises ValueError with a plain message naming the bad key."""
        merged = conf.merged("CLOUDWATCH", data)
        namespace = merged["NAMESPACE"]
        if not valid_namespace(namespace):
            raise ValueError(f"NAMESPACE must be 1-255 characters of A-Z a-z 0-9 . _ # : / - "
                             f"and not start with 'AWS/', not {namespace!r}")
        logger = merged["LOGGER"]
        if not isinstance(logger, str) or not logger.strip():
            raise ValueError(f"LOGGER must be a logger name, not {logger!r}")
        put_metric_data = merged["PUT_METRIC_DATA"]
        if not isinstance(put_metric_data, bool):
            raise ValueError(f"PUT_METRIC_DATA must be True or False, not {put_metric_data!r}")
        # PutMetricData waits for the network: never in the task's thread, so never one
        # call per event.
        interval = _seconds("FLUSH_INTERVAL_SECONDS", merged["FLUSH_INTERVAL_SECONDS"],
                            zero_allowed=not put_metric_data)
        most = merged["MAX_BUFFERED_SERIES"]
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise ValueError(f"MAX_BUFFERED_SERIES must be an integer >= 1, not {most!r}")
        endpoint = _optional_text("ENDPOINT_URL", merged["ENDPOINT_URL"])
        if endpoint is not None and not endpoint.startswith(("https://", "http://")):
            raise ValueError(f"ENDPOINT_URL must be an http(s):// URL or None, not {endpoint!r}")
        return cls(
            namespace=namespace,
            logger=logger,
            flush_interval_seconds=interval,
            max_buffered_series=most,
            put_metric_data=put_metric_data,
            region=_optional_text("REGION", merged["REGION"]),
            endpoint_url=endpoint,
            timeout_seconds=_seconds("TIMEOUT_SECONDS", merged["TIMEOUT_SECONDS"],
                                     zero_allowed=False),
        )


def current() -> CloudWatchOptions:
    """The current ``RECOVERY["CLOUDWATCH"]``; raises ValueError if it is invalid."""
    return CloudWatchOptions.from_dict(conf.get("CLOUDWATCH"))
