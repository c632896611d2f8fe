"""The S3 endpoint goes away for 10 seconds in the middle of pretraining (a save being mirrored there) and comes
back: the stage fails on a transient storage error, Prefect retries it, it resumes from its local save, and the
build completes."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from adaptflow.flows.cli import app
from tests.conftest import DATA_ROOT, DOMAINS
from tests.s3 import SwitchableEndpoint

OUTAGE_SECONDS = 10


@pytest.mark.usefixtures("prefect_server")
def test_a_build_survives_its_s3_endpoint_going_away_for_ten_seconds(tmp_path, s3_env, s3_server, tiny_overrides,
                                                                     monkeypatch):
    direct = boto3.client("s3", endpoint_url=s3_server)
    direct.upload_file(str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"), s3_env,
                       "corpora/abstracts.txt")
    endpoint = SwitchableEndpoint(s3_server)
    endpoint.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)  # the build reaches S3 only through the switchable endpoint

    outage: dict[str, float] = {}

    def take_s3_down_after_the_first_mirrored_save():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listed = direct.list_objects_v2(Bucket=s3_env, Prefix="mirror/").get("Contents", [])
            if any(o["Key"].endswith("trainer_state.json") for o in listed):
                endpoint.down()
                outage["down"] = time.time()
                time.sleep(OUTAGE_SECONDS)
                endpoint.up()
                outage["up"] = time.time()
                return
            time.sleep(0.05)

    saboteur = threading.Thread(target=take_s3_down_after_the_first_mirrored_save, daemon=True)
    saboteur.start()
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*tiny_overrides, f"corpora.domain.path=s3://{s3_env}/corpora/abstracts.txt",
                 f"checkpoint_mirror=s3://{s3_env}/mirror", "stages.pretrain.max_steps=120",
                 "stages.pretrain.save_every=10", "stages.pretrain.eval_every=0", "stages.finetune.seeds=[1]",
                 "evaluation.enabled=false", "registry.enabled=false"]
    result = CliRunner().invoke(app, ["build", str(DOMAINS / "tiny.yaml"), "--no-progress", "--tracking-uri", db,
                                      *[a for o in overrides for a in ("--set", o)]])
    saboteur.join(timeout=60)
    endpoint.up() if "up" not in outage else None
    assert result.exit_code == 0, result.output[-5000:]
    assert outage.get("up"), "the endpoint never went down: no mirrored save was seen"

    client = MlflowClient(db)
    experiment = client.get_experiment_by_name("adaptflow-tiny")
    build = client.search_runs([experiment.experiment_id], "tags.`adaptflow.kind` = 'build'")[0]
    assert build.info.status == "FINISHED"
    assert build.info.start_time / 1000 < outage["down"] < outage["up"] < build.info.end_time / 1000
    attempts = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{build.info.run_id}' "
                                  "and attributes.run_name = 'pretrain'", order_by=["attributes.start_time ASC"])
    statuses = [run.info.status for run in attempts]
    assert statuses[-1] == "FINISHED" and set(statuses[:-1]) == {"FAILED"} and len(statuses) >= 2, statuses
    final = attempts[-1]
    logged = [m.step for m in client.get_metric_history(final.info.run_id, "loss")]
    assert min(logged) > 10 and max(logged) == 120, "the retried stage resumed from its save, not from step 0"
    mirrored = direct.list_objects_v2(Bucket=s3_env, Prefix="mirror/")["Contents"]
    assert {o["Key"].split("/")[2] for o in mirrored if not o["Key"].endswith("/")} == {"step-0000120"}
