"""Two builds of one recipe at once: each writes its own stage directories, registers its own version, and the
aliases end where the audit trail says, with no promotion decided against a champion that had moved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from adaptflow.recipe import load_recipe
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.stage_runs import claimed_work_dir
from adaptflow.tracking.registry import audit_trail
from tests.conftest import DOMAINS, ROOT

BIN = Path(sys.executable).parent


def test_a_stage_directory_is_claimed_by_one_live_build_at_a_time(tmp_path):
    recipe = load_recipe(DOMAINS / "tiny.yaml", [f"workdir={tmp_path}"])

    def context(run_id: str) -> BuildContext:
        return BuildContext(recipe=recipe, tracking=None, experiment_id="0", build_run_id=run_id)

    with claimed_work_dir(context("a"), "pretrain", "k1") as first:
        with claimed_work_dir(context("b"), "pretrain", "k1") as second:
            assert first == tmp_path / "stages" and second == tmp_path / "builds" / "b" / "stages"
        with claimed_work_dir(context("c"), "pretrain", "k2") as other_key:
            assert other_key == tmp_path / "stages"
    with claimed_work_dir(context("d"), "pretrain", "k1") as after:
        assert after == tmp_path / "stages", "released when the first build's stage ended"

    # A holder killed outright (no cleanup runs) releases its claim with its process.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', "
        "flush=True); time.sleep(600)"), str(tmp_path / "stages" / ".pretrain-k1.lock")], stdout=subprocess.PIPE,
        text=True)
    assert holder.stdout.readline().strip() == "held"
    with claimed_work_dir(context("e"), "pretrain", "k1") as while_held:
        assert while_held == tmp_path / "builds" / "e" / "stages"
    holder.kill()
    holder.wait()
    with claimed_work_dir(context("f"), "pretrain", "k1") as after_kill:
        assert after_kill == tmp_path / "stages"


@pytest.mark.usefixtures("prefect_server")
def test_two_builds_of_one_recipe_at_once_clobber_nothing(tmp_path, tiny_overrides):
    from prefect.settings import PREFECT_API_URL

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    overrides = [*tiny_overrides, "stages.pretrain.max_steps=60", "stages.pretrain.save_every=20",
                 "stages.finetune.seeds=[1]", "registry.auto_promote=true", "evaluation.gates.min_task_metric=0.0",
                 "evaluation.gates.min_gain_over_champion=-1.0"]
    command = [str(BIN / "adaptflow"), "build", str(DOMAINS / "tiny.yaml"), "--no-progress", "--tracking-uri", db,
               *[a for o in overrides for a in ("--set", o)]]
    builds = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [build.communicate(timeout=900)[0] for build in builds]
    for build, output in zip(builds, outputs, strict=True):
        assert build.returncode == 0, output[-6000:]

    client = MlflowClient(db)
    experiment = client.get_experiment_by_name("adaptflow-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("adaptflow.kind") == "build"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]

    # Stage runs that computed in the same directory never overlapped in time.
    computed = [r for r in runs if "adaptflow.work_dir" in r.data.tags and "adaptflow.reused_from" not in r.data.tags]
    for i, one in enumerate(computed):
        for other in computed[i + 1:]:
            if one.data.tags["adaptflow.work_dir"] == other.data.tags["adaptflow.work_dir"]:
                assert one.info.end_time <= other.info.start_time or other.info.end_time <= one.info.start_time, (
                    f"{one.info.run_name} and {other.info.run_name} wrote {one.data.tags['adaptflow.work_dir']} "
                    "at the same time")
    pretrains = [r for r in computed if r.info.run_name == "pretrain"]
    if len(pretrains) == 2 and _overlap(*pretrains):
        assert {Path(r.data.tags["adaptflow.work_dir"]).parent.name for r in pretrains} == {"stages"}
        assert len({r.data.tags["adaptflow.work_dir"] for r in pretrains}) == 2

    # Each build registered its own model; the newer one is the challenger.
    name = "adaptflow-tiny"
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == ["1", "2"]
    assert {v.run_id for v in versions.values()} == {r.info.run_id for r in parents}
    for version in versions.values():
        build = next(r for r in parents if r.info.run_id == version.run_id)
        finetune = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == build.info.run_id
                        and r.info.run_name == "finetune-seed1")
        assert version.tags["adaptflow.checkpoint.digest"] == finetune.data.tags["adaptflow.checkpoint.digest"]
        assert version.source.startswith(build.info.artifact_uri)
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"

    # No promotion was decided against a champion that had moved: each one's `previous` is the one before it.
    trail = audit_trail(client, name)
    assert len(trail) == 2 and trail[0]["action"] == "promote"
    champion = None
    for entry in trail:
        assert entry.get("previous") == champion, trail
        if entry["action"] == "promote":
            champion = entry["version"]
        else:
            assert entry["action"] == "refused" and "moved from unset to" in entry["reason"], entry
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion


def _overlap(one, other) -> bool:
    return one.info.start_time < other.info.end_time and other.info.start_time < one.info.end_time
