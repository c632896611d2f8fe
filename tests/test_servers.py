"""The operations path on real servers: a `prefect server`, an `mlflow server` (SQLite, artifacts on S3 through
moto's server), `adaptflow deploy`, `prefect deployment run` and a process worker executing the build."""

from __future__ import annotations

import json
import os
import subprocess

from mlflow import MlflowClient

from tests.conftest import DATA_ROOT, DOMAINS
from tests.servers import BIN, mlflow_server, prefect_server

POOL = "adaptflow-test"


def _run(command: list[str], env: dict, timeout: float = 600) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def test_a_deployed_recipe_runs_on_a_worker_and_its_second_build_reuses_pretraining(tmp_path, s3_env, s3_server,
                                                                                   tiny_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "ADAPTFLOW_DATA_ROOT": str(DATA_ROOT), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with (prefect_server(tmp_path / "prefect", env) as prefect_api,
          mlflow_server(tmp_path / "mlflow", f"s3://{s3_env}/mlartifacts", env) as tracking):
        env |= {"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect"),
                "MLFLOW_TRACKING_URI": tracking}
        overrides = [*tiny_overrides, "stages.finetune.seeds=[1]", "registry.auto_promote=true",
                     "evaluation.gates.min_task_metric=0.0", "schedule.cron=0 3 * * *",
                     "schedule.timezone=Europe/Berlin"]
        out = _run([str(BIN / "adaptflow"), "deploy", str(DOMAINS / "tiny.yaml"), "--pool", POOL,
                    *[a for o in overrides for a in ("--set", o)]], env)
        assert "deployment build/tiny" in out and "0 3 * * * (Europe/Berlin)" in out
        deployment = json.loads(_stdout([str(BIN / "prefect"), "--no-prompt", "deployment", "inspect", "build/tiny",
                                      "--output", "json"], env))
        assert deployment["work_pool_name"] == POOL and deployment["parameters"]["recipe_path"] == "domains/tiny.yaml"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        assert deployment["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"

        def build_through_worker(params: dict | None = None) -> dict:
            command = [str(BIN / "prefect"), "deployment", "run", "build/tiny"]
            _run(command + (["--params", json.dumps(params)] if params else []), env)
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
