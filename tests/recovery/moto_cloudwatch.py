"""A local CloudWatch: moto's server on 127.0.0.1, on a port of its own, for the
PutMetricData tests. Import the fixture into a test module to use it."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "eu-west-1"


@dataclass(frozen=True)
class LocalCloudWatch:
    endpoint_url: str
    region: str = REGION

    def client(self):
        return boto3.client("cloudwatch", region_name=self.region,
                            endpoint_url=self.endpoint_url)


@pytest.fixture
def moto_cloudwatch(monkeypatch) -> LocalCloudWatch:
    # Credentials moto accepts, so boto3 never looks further (no real account is reached).
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its state per process, not per server: start from an empty CloudWatch
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"),
                           timeout=10).close()
    try:
        yield LocalCloudWatch(endpoint_url=endpoint)
    finally:
        server.stop()
