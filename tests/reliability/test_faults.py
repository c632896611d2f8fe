"""Faults: a build that dies leaves nothing that looks alive. (A killed stage resuming from its last save, and a
crashed flow run retried from Prefect, are tested in tests/test_train.py, tests/test_launch.py and
tests/test_servers.py.)"""

from __future__ import annotations

import os
import socket
import subprocess

from mlflow import MlflowClient

from adaptflow.config import load_recipe
from adaptflow.tracking import ensure_experiment, start_run
from tasks.build_run import build_run
from tests.conftest import DOMAINS


def test_runs_of_a_build_killed_on_this_host_are_closed_by_the_next_build(tmp_path, tiny_overrides):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(db)
    experiment = ensure_experiment(client, "adaptflow-tiny", str(tmp_path / "artifacts"))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: the build that held it was SIGKILLed
    here = socket.gethostname()

    def build(host: str, pid: int) -> str:
        return start_run(client, experiment, "build-tiny",
                         tags={"adaptflow.kind": "build", "adaptflow.host": host, "adaptflow.pid": pid})

    crashed = build(here, gone.pid)
    crashed_stage = start_run(client, experiment, "pretrain", tags={}, parent_run_id=crashed)
    alive = build(here, os.getpid())  # a build still running in this very process
    elsewhere = build("another-host", gone.pid)  # cannot be checked from here: left alone

    recipe = load_recipe(DOMAINS / "tiny.yaml", tiny_overrides)
    with build_run(recipe, tracking_uri=db, trigger="manual") as ctx:
        new = ctx.build_run_id
    status = {run_id: client.get_run(run_id).info.status for run_id in (crashed, crashed_stage, alive, elsewhere, new)}
    assert status == {crashed: "KILLED", crashed_stage: "KILLED", alive: "RUNNING", elsewhere: "RUNNING",
                      new: "FINISHED"}
    assert client.get_run(crashed).data.tags["adaptflow.note"] == f"killed: its process ({gone.pid}) on this host is gone"
