"""Faults: a build that dies leaves nothing that looks alive, and nothing half-written that looks whole. (A killed
stage resuming from its last save, and a crashed flow run retried from Prefect, are tested in
tests/stages/test_pretrain.py, tests/test_launch.py and tests/flow/test_servers.py.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from adaptflow.data.corpus import prepare_corpus
from adaptflow.errors import DataError
from adaptflow.models import load_model
from adaptflow.recipe import load_recipe
from adaptflow.stages import StageEnv
from adaptflow.stages import pretrain as stage
from adaptflow.stages.pretrain import Config as PretrainConfig
from adaptflow.tasks.build_run import HEARTBEAT, STALE_AFTER_SECONDS, build_run
from adaptflow.tracking.runs import ensure_experiment, start_run
from adaptflow.train.checkpointing import damage, latest_training_state
from tests.conftest import DOMAINS, ROOT
from tests.stages.test_pretrain import ABSTRACTS, assert_same_weights, base_model, pretrain


def test_runs_of_a_build_killed_here_or_silent_elsewhere_are_closed_by_the_next_build(tmp_path, tiny_overrides):
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
    elsewhere = build("another-host", gone.pid)  # its pid means nothing here; no heartbeat recorded: left alone
    beating = build("another-host", gone.pid)
    client.set_tag(beating, HEARTBEAT, f"{time.time() - 60:.0f}")  # a minute ago: alive
    silent = build("lost-node", gone.pid)
    silent_stage = start_run(client, experiment, "finetune-seed0", tags={}, parent_run_id=silent)
    client.set_tag(silent, HEARTBEAT, f"{time.time() - STALE_AFTER_SECONDS - 120:.0f}")

    recipe = load_recipe(DOMAINS / "tiny.yaml", tiny_overrides)
    with build_run(recipe, tracking_uri=db, trigger="manual") as ctx:
        new = ctx.build_run_id
        assert time.time() - float(client.get_run(new).data.tags[HEARTBEAT]) < 30, "a live build beats"
    runs = (crashed, crashed_stage, alive, elsewhere, beating, silent, silent_stage, new)
    status = {run_id: client.get_run(run_id).info.status for run_id in runs}
    assert status == {crashed: "KILLED", crashed_stage: "KILLED", alive: "RUNNING", elsewhere: "RUNNING",
                      beating: "RUNNING", silent: "KILLED", silent_stage: "KILLED", new: "FINISHED"}
    assert client.get_run(crashed).data.tags["adaptflow.note"] == f"killed: its process ({gone.pid}) on this host is gone"
    assert client.get_run(silent).data.tags["adaptflow.note"] == "killed: no heartbeat from lost-node for 17 min"


# ---------------------------------------------------------------- a kill in the middle of writing a save

KILLED_MID_SAVE = """
import json, os, signal, sys
import safetensors.torch
from adaptflow.stages import StageEnv, pretrain
from adaptflow.train import checkpointing

args = json.loads(sys.argv[1])
saves = []

def save_file(tensors, path, metadata=None):
    saves.append(path)
    if len(saves) == 2:  # the second save (step 10): half its optimizer file reaches the disk, then SIGKILL
        data = safetensors.torch.save(tensors, metadata)
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return safetensors.torch.save_file(tensors, path, metadata)

checkpointing.save_file = save_file
pretrain.run(pretrain.Config(**args["config"]), pretrain.Inputs.from_dict(args["inputs"]),
             StageEnv(work_dir=args["work_dir"], cache_dir=args["cache_dir"], seed=0))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus(ABSTRACTS, name="domain", out_dir=tmp_path_factory.mktemp("datasets"), max_documents=60,
                          validation_fraction=0.15, seed=0)


def test_a_kill_while_a_save_is_written_leaves_the_previous_save_to_resume_from(tmp_path, corpus):
    base = base_model(tmp_path, corpus)
    settings = dict(block_size=32, batch_size=8, max_steps=12, lr=3e-3, log_every=1, save_every=5, eval_every=0)
    reference, _ = pretrain(tmp_path / "uninterrupted", corpus, base, **settings)
    work_dir = tmp_path / "stages"
    inputs = stage.Inputs(base=base, train=corpus.train, validation=corpus.validation)
    args = {"config": settings, "inputs": inputs.to_dict(), "work_dir": str(work_dir),
            "cache_dir": str(tmp_path / "cache")}
    child = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, json.dumps(args)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    states = next(work_dir.glob("pretrain-*/checkpoints"))
    assert sorted(p.name for p in states.iterdir()) == [".step-0000010.partial", "step-0000005"]
    assert latest_training_state(states) == states / "step-0000005"
    assert damage(states / "step-0000005") is None, "the previous save is intact, file by file"

    steps = []
    config = PretrainConfig(**settings)
    resumed = stage.run(config, inputs, StageEnv(work_dir=work_dir, cache_dir=tmp_path / "cache", seed=0,
                                                 log_metrics=lambda step, m: "loss" in m and steps.append(step)))
    resumed = resumed.checkpoint
    assert steps[0] == 6, "resumed after step 5, the last save that was whole"
    assert_same_weights(resumed, reference)
    assert sorted(p.name for p in states.iterdir()) == ["step-0000010"], "the half-written save was cleared"


def test_a_save_damaged_after_it_was_written_is_not_resumed_from(tmp_path, corpus, caplog):
    base = base_model(tmp_path, corpus)
    ref, _ = pretrain(tmp_path, corpus, base, max_steps=6, save_every=5, eval_every=0)
    states = next((tmp_path / "stages").glob("pretrain-*/checkpoints"))
    save = states / "step-0000005"
    assert damage(save) is None
    with open(save / "optimizer.safetensors", "r+b") as fh:  # one flipped byte in the middle of a tensor
        fh.seek(fh.seek(0, 2) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert "optimizer.safetensors" in damage(save)
    with caplog.at_level(logging.WARNING, logger="adaptflow.train.checkpointing"):
        assert latest_training_state(states) is None
    assert "ignoring the save" in caplog.text and "differ from the digests recorded" in caplog.text

    weights = Path(ref.uri) / "model.safetensors"  # a stage's final checkpoint is checked when the next loads it
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"modified or damaged since; rerun from that stage \(adaptflow rerun "
                                        r"--from pretrain\)"):
        load_model(ref, "mlm")
