"""The operations path on real servers: a `prefect server`, an `mlflow server` (SQLite, artifacts on S3 through
moto's server), `adaptflow deploy`, `prefect deployment run` and a process worker executing the build; then a
flow run killed mid-stage and retried from Prefect."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from adaptflow.train.checkpointing import latest_training_state
from tests.conftest import DATA_ROOT, DOMAINS
from tests.servers import BIN, mlflow_server, prefect_server

POOL = "adaptflow-test"


@dataclass
class Stack:
    env: dict
    prefect_api: str
    tracking: str


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    bucket = f"adaptflow-stack-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env |= {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "ADAPTFLOW_DATA_ROOT": str(DATA_ROOT), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with (prefect_server(root / "prefect", env) as prefect_api,
          mlflow_server(root / "mlflow", f"s3://{bucket}/mlartifacts", env) as tracking):
        yield Stack(env | {"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(root / "prefect"),
                           "MLFLOW_TRACKING_URI": tracking}, prefect_api, tracking)


def _run(command: list[str], env: dict, timeout: float = 600) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def _deploy(stack: Stack, overrides: list[str]) -> str:
    return _run([str(BIN / "adaptflow"), "deploy", str(DOMAINS / "tiny.yaml"), "--pool", POOL,
                 *[a for o in overrides for a in ("--set", o)]], stack.env)


def _trigger(stack: Stack, params: dict | None = None) -> str:
    """`prefect deployment run build/tiny`; returns the new flow run's id."""
    command = [str(BIN / "prefect"), "deployment", "run", "build/tiny"]
    out = _run(command + (["--params", json.dumps(params)] if params else []), stack.env)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def test_a_deployed_recipe_runs_on_a_worker_and_its_second_build_reuses_pretraining(stack, tiny_overrides):
    env, tracking = stack.env, stack.tracking
    overrides = [*tiny_overrides, "stages.finetune.seeds=[1]", "registry.auto_promote=true",
                 "evaluation.gates.min_task_metric=0.0", "schedule.cron=0 3 * * *",
                 "schedule.timezone=Europe/Berlin"]
    out = _deploy(stack, overrides)
    assert "deployment build/tiny" in out and "0 3 * * * (Europe/Berlin)" in out
    deployment = json.loads(_stdout([str(BIN / "prefect"), "--no-prompt", "deployment", "inspect", "build/tiny",
                                  "--output", "json"], env))
    assert deployment["work_pool_name"] == POOL and deployment["parameters"]["recipe_path"] == "domains/tiny.yaml"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"

    def build_through_worker(params: dict | None = None) -> dict:
        _trigger(stack, params)
        _run([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--run-once"], env)
        return _newest_build(MlflowClient(tracking))

    first = build_through_worker()
    client = MlflowClient(tracking)
    assert first.info.status == "FINISHED" and first.data.tags["adaptflow.trigger"] == "deployment"
    assert first.data.tags["prefect.deployment_id"] == deployment["id"]
    version = client.get_model_version_by_alias("adaptflow-tiny", "champion")
    assert version.run_id == first.info.run_id
    assert client.get_run(first.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")

    # Only the fine-tuning learning rate changes: pretraining is reused, in a fraction of its time.
    second = build_through_worker({"overrides": [*overrides, "stages.finetune.lr=0.001"]})
    assert second.info.run_id != first.info.run_id and second.info.status == "FINISHED"
    pretrain_1, pretrain_2 = _child(client, first, "pretrain"), _child(client, second, "pretrain")
    assert pretrain_2.data.tags["adaptflow.reused_from"] == pretrain_1.info.run_id
    assert "adaptflow.reused_from" not in _child(client, second, "finetune-seed1").data.tags
    assert _seconds(pretrain_2) < _seconds(pretrain_1) / 2, (_seconds(pretrain_2), _seconds(pretrain_1))
    assert client.get_model_version_by_alias("adaptflow-tiny", "challenger").run_id == second.info.run_id


def _stdout(command: list[str], env: dict) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _newest_build(client: MlflowClient):
    experiment = client.get_experiment_by_name("adaptflow-tiny")
    return client.search_runs([experiment.experiment_id], "tags.`adaptflow.kind` = 'build'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]


def _child(client: MlflowClient, build, name: str):
    runs = client.search_runs([build.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{build.info.run_id}' and attributes.run_name = '{name}'")
    assert len(runs) == 1, name
    return runs[0]


def _seconds(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def test_a_flow_run_killed_mid_stage_and_retried_from_prefect_resumes_that_stage(stack, tmp_path):
    """The worker's flow process is SIGKILLed during pretraining, after a resumable save; `prefect flow-run retry`
    runs the build again: pretraining resumes from the save, the crashed attempt's MLflow runs are closed."""
    workdir = tmp_path / "runs"
    overrides = [f"workdir={workdir}", "corpora.domain.max_documents=80", "corpora.general.max_documents=200",
                 "stages.pretrain.max_steps=400", "stages.pretrain.save_every=20", "stages.pretrain.log_every=10",
                 "stages.pretrain.eval_every=0", "stages.finetune.seeds=[1]", "stages.finetune.max_steps=8",
                 "evaluation.enabled=false", "registry.enabled=false"]
    _deploy(stack, overrides)
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as out:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                                  env=stack.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        flow_run_id = _trigger(stack)
        states = None
        deadline = time.monotonic() + 300
        while (states := latest_training_state(_pretrain_states(workdir))) is None:
            assert time.monotonic() < deadline, "no resumable save within 5 minutes"
            time.sleep(0.2)
        saved_step = int(states.name.removeprefix("step-"))
        os.kill(_flow_process(flow_run_id), signal.SIGKILL)
        assert _wait_for_state(stack, flow_run_id, {"CRASHED", "FAILED"}) in {"CRASHED", "FAILED"}
        # The worker handles the dead process a moment after the runner reported the crash (and would report it
        # again over a retry made in between): retry once it has, as a person would.
        settled = time.monotonic() + 30
        while "prefect.flow_runs.worker - Check whether" not in worker_log.read_text() and time.monotonic() < settled:
            time.sleep(0.2)

        _run([str(BIN / "prefect"), "flow-run", "retry", flow_run_id], stack.env)
        final = _wait_for_state(stack, flow_run_id, {"COMPLETED", "FAILED", "CRASHED"}, after_retry=True)
        assert final == "COMPLETED", worker_log.read_text()[-6000:]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)

    client = MlflowClient(stack.tracking)
    experiment = client.get_experiment_by_name("adaptflow-tiny")
    attempts = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert [run.info.status for run in attempts] == ["KILLED", "FINISHED"]
    killed, retried = attempts
    assert _child(client, killed, "pretrain").info.status == "KILLED"
    pretrain = _child(client, retried, "pretrain")
    logged = [m.step for m in client.get_metric_history(pretrain.info.run_id, "loss")]
    assert min(logged) > saved_step and max(logged) == 400  # resumed after the save, not from step 0
    assert _child(client, retried, "finetune-seed1").info.status == "FINISHED"


def _pretrain_states(workdir: Path) -> Path:
    found = list((workdir / "stages").glob("pretrain-*/checkpoints")) if (workdir / "stages").is_dir() else []
    return found[0] if found else workdir / "missing"


def _flow_process(flow_run_id: str) -> int:
    """The pid of the process the worker started for `flow_run_id` (it carries the id in its environment)."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no process runs flow run {flow_run_id}")


def _wait_for_state(stack: Stack, flow_run_id: str, terminal: set[str], timeout: float = 420,
                    after_retry: bool = False) -> str:
    """The flow run's first terminal state (`after_retry`: the first one after it ran again)."""
    deadline = time.monotonic() + timeout
    ran_again = not after_retry
    while time.monotonic() < deadline:
        state = _flow_run(stack, flow_run_id)["state"]["type"]
        ran_again = ran_again or state in {"SCHEDULED", "PENDING", "RUNNING"}
        if ran_again and state in terminal:
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} still {state} after {timeout:.0f} s")


def _flow_run(stack: Stack, flow_run_id: str) -> dict:
    with urllib.request.urlopen(f"{stack.prefect_api}/flow_runs/{flow_run_id}", timeout=10) as response:
        return json.load(response)
