"""recovery.observe.cloudwatch.options: RECOVERY["CLOUDWATCH"] merged over its defaults, and
refused with a message naming the key when CloudWatch (or this backend) could not use it."""

from __future__ import annotations

import pytest

from recovery import conf
from recovery.observe.cloudwatch.options import CloudWatchOptions


def test_keys_left_out_keep_their_defaults():
    options = CloudWatchOptions.from_dict({"NAMESPACE": "Shop/Recovery"})

    assert options == CloudWatchOptions(namespace="Shop/Recovery")
    assert CloudWatchOptions.from_dict(None) == CloudWatchOptions()
    defaults = conf.DEFAULTS["CLOUDWATCH"]
    assert CloudWatchOptions() == CloudWatchOptions(
        namespace=defaults["NAMESPACE"], logger=defaults["LOGGER"],
        flush_interval_seconds=defaults["FLUSH_INTERVAL_SECONDS"],
        max_buffered_series=defaults["MAX_BUFFERED_SERIES"],
        put_metric_data=defaults["PUT_METRIC_DATA"], region=defaults["REGION"],
        endpoint_url=defaults["ENDPOINT_URL"], timeout_seconds=defaults["TIMEOUT_SECONDS"])


def test_a_full_valid_setting_is_read():
    options = CloudWatchOptions.from_dict({
        "NAMESPACE": "Shop", "LOGGER": "shop.emf", "FLUSH_INTERVAL_SECONDS": 30,
        "MAX_BUFFERED_SERIES": 50, "PUT_METRIC_DATA": True, "REGION": "eu-west-1",
        "ENDPOINT_URL": "https://monitoring.eu-west-1.amazonaws.com", "TIMEOUT_SECONDS": 2})

    assert options.flush_interval_seconds == 30.0 and options.put_metric_data is True
    assert options.region == "eu-west-1" and options.timeout_seconds == 2.0


@pytest.mark.parametrize("value, message", [
    ("not a dict", "must be a dict"),
    ({"NAMESPAC": "x"}, "unknown RECOVERY\\['CLOUDWATCH'\\] keys: NAMESPAC"),
    ({"NAMESPACE": "AWS/Lambda"}, "NAMESPACE"),
    ({"NAMESPACE": "two words"}, "NAMESPACE"),
    ({"NAMESPACE": ""}, "NAMESPACE"),
    ({"LOGGER": ""}, "LOGGER"),
    ({"FLUSH_INTERVAL_SECONDS": -1}, "FLUSH_INTERVAL_SECONDS"),
    ({"FLUSH_INTERVAL_SECONDS": "10"}, "FLUSH_INTERVAL_SECONDS"),
    ({"FLUSH_INTERVAL_SECONDS": 0, "PUT_METRIC_DATA": True}, "FLUSH_INTERVAL_SECONDS must be a positive"),
    ({"MAX_BUFFERED_SERIES": 0}, "MAX_BUFFERED_SERIES"),
    ({"MAX_BUFFERED_SERIES": True}, "MAX_BUFFERED_SERIES"),
    ({"PUT_METRIC_DATA": "yes"}, "PUT_METRIC_DATA"),
    ({"REGION": ""}, "REGION"),
    ({"ENDPOINT_URL": "monitoring.example.com"}, "ENDPOINT_URL"),
    ({"TIMEOUT_SECONDS": 0}, "TIMEOUT_SECONDS"),
])
def test_a_bad_value_is_refused_naming_its_key(value, message):
    with pytest.raises(ValueError, match=message):
        CloudWatchOptions.from_dict(value)


def test_one_line_per_event_is_allowed_for_emf_lines_only():
    assert CloudWatchOptions.from_dict({"FLUSH_INTERVAL_SECONDS": 0}).flush_interval_seconds == 0
