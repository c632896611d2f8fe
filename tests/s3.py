"""Pytest fixtures for a real S3 API on loopback: moto in server mode, spoken to over HTTP.

Register from ``tests/conftest.py`` with ``pytest_plugins = ["tests.s3"]``. Tests then take
``s3_env`` (environment pointed at the server, a fresh bucket) and talk to it with real clients.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import boto3
import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (free port) for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request to stderr, which buries real failures in test output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the AWS environment at ``s3_server`` with dummy credentials; yields a new empty bucket's name."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"adaptflow-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield bucket


@pytest.fixture
def s3_client(s3_env: str, s3_server: str):
    """A boto3 S3 client for the loopback server, for putting and inspecting test objects."""
    return boto3.client("s3", endpoint_url=s3_server)
