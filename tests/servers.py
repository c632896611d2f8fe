"""Real servers on loopback for integration tests: `prefect server start` and `mlflow server`, as users run them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptflow.train.runtime import free_port

BIN = Path(sys.executable).parent


@contextmanager
def serving(command: list[str], health_url: str, *, env: dict, log: Path, timeout: float = 180) -> Iterator[None]:
    """Start `command`, wait until `health_url` answers 200, stop it (and its children) afterwards."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{health_url} not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


@contextmanager
def prefect_server(home: Path, env: dict) -> Iterator[str]:
    """`prefect server start` on a free port with its own SQLite database under `home`; yields the API URL."""
    port = free_port()
    env = env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_UI_ENABLED": "false"}
    home.mkdir(parents=True, exist_ok=True)
    with serving([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 f"http://127.0.0.1:{port}/api/health", env=env, log=home / "server.log"):
        yield f"http://127.0.0.1:{port}/api"


@contextmanager
def mlflow_server(root: Path, artifacts: str, env: dict) -> Iterator[str]:
    """`mlflow server` on a free port: SQLite backend under `root`, artifacts proxied to `artifacts` (an S3 URI)."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", artifacts]
    with serving(command, f"http://127.0.0.1:{port}/health", env=env, log=root / "server.log"):
        yield f"http://127.0.0.1:{port}"
