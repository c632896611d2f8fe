"""Stages launched under torchrun by `launch_stage`: results come back from rank 0, a failing or killed rank
fails the stage with that rank's last lines, and a rerun resumes from the last saved step."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from adaptflow.config import DistributedConfig, ModelConfig, TinyModelConfig
from adaptflow.data.corpus import prepare_corpus
from adaptflow.launch import StageFailed, _root_cause, join_launches, launch_stage
from adaptflow.models import materialize_base_model
from adaptflow.stages import StageEnv, pretrain
from adaptflow.train.runtime import free_port
from tests.conftest import DOMAINS

TWO_RANKS = DistributedConfig(launcher="torchrun", nproc_per_node=2, omp_num_threads=1, timeout_minutes=10)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, abstracts):
    tmp = tmp_path_factory.mktemp("launch")
    corpus_file = tmp / "abstracts.txt"
    corpus_file.write_text("\n".join(abstracts))
    corpus = prepare_corpus(str(corpus_file), name="abstracts", out_dir=tmp / "data", validation_fraction=0.1)
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=64, vocab_size=300)
    base = materialize_base_model(ModelConfig(tiny=tiny), out_dir=tmp / "models", tokenizer_texts=abstracts, seed=0)
    return pretrain.Inputs(base=base, train=corpus.train)


def launch(inputs, work_dir: Path, *, distributed, job_dir, deepspeed=None, **config):
    """The pretraining stage on tiny settings, launched on `distributed`'s ranks."""
    settings = pretrain.Config(corpus="abstracts", block_size=32, batch_size=4, eval_every=0, log_every=1,
                               **{"max_steps": 6, **config})
    return launch_stage(pretrain, settings, inputs, StageEnv(work_dir=work_dir, deepspeed=deepspeed),
                        distributed=distributed, job_dir=job_dir)


DEEPSPEED_LAUNCHER = TWO_RANKS.model_copy(update={"launcher": "deepspeed"})


def test_a_launched_stage_returns_rank_zeros_checkpoint(inputs, tmp_path):
    ran = launch(inputs, tmp_path / "stages", distributed=TWO_RANKS, job_dir=tmp_path / "job")
    result = ran.result.checkpoint
    assert ran.world_size == 2 and result.stage == "pretrain"
    assert (Path(result.uri) / "model.safetensors").is_file() and len(result.digest) == 16
    assert sorted(p.name for p in (tmp_path / "job" / "logs").glob("*/attempt_0/*")) == ["0", "1"]


def test_the_deepspeed_launcher_runs_a_stage_on_two_ranks_from_a_localhost_hostfile(inputs, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# host slots\nlocalhost slots=2\n")
    ranks = DistributedConfig(launcher="deepspeed", nproc_per_node=2, hostfile=str(hostfile), omp_num_threads=1,
                              rdzv_endpoint=f"127.0.0.1:{free_port()}", timeout_minutes=10)
    ran = launch(inputs, tmp_path / "stages", deepspeed=str(DOMAINS.parent / "infra/deepspeed/zero2.json"),
                 distributed=ranks, job_dir=tmp_path / "job")
    assert ran.world_size == 2 and (Path(ran.result.checkpoint.uri) / "model.safetensors").is_file()


@pytest.mark.parametrize("launcher", [TWO_RANKS, DEEPSPEED_LAUNCHER], ids=["torchrun", "deepspeed"])
def test_an_error_on_the_ranks_fails_the_stage_with_their_last_lines(inputs, tmp_path, launcher):
    broken = dataclasses.replace(inputs, base=dataclasses.replace(inputs.base, uri=str(tmp_path / "missing")))
    with pytest.raises(StageFailed, match=r"(?s)failed on (local )?rank \d.*missing"):
        launch(broken, tmp_path / "stages", distributed=launcher, job_dir=tmp_path / "job")


def test_two_nodes_rendezvous_on_loopback_node_1_started_by_its_agent(inputs, tmp_path):
    """Node 0 launches the stage as a build does; node 1's agent (`adaptflow node`) finds the spec in the shared
    workdir and starts its rank; the stage completes with world size 2 and only node 0 gets the result."""
    nodes = DistributedConfig(launcher="torchrun", nnodes=2, nproc_per_node=1, omp_num_threads=1,
                              rdzv_endpoint=f"127.0.0.1:{free_port()}", timeout_minutes=10)
    joined = []
    agent = threading.Thread(target=lambda: joined.append(join_launches(tmp_path, 1, poll_seconds=0.2)))
    agent.start()
    ran = launch(inputs, tmp_path / "stages", distributed=nodes, job_dir=tmp_path / "launch" / "pretrain-key")
    (tmp_path / "launch" / "agents.stop").touch()  # what node 0's job script does when the build ends
    agent.join(timeout=60)
    assert joined == [1] and ran.world_size == 2
    assert (Path(ran.result.checkpoint.uri) / "model.safetensors").is_file()
    assert (tmp_path / "launch" / "pretrain-key" / "logs-node1").is_dir()


def rank_pids(spec: Path) -> dict[int, int]:
    """PID of each local rank running `spec` (torchrun's workers carry LOCAL_RANK in their environment)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or str(spec).encode() not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"LOCAL_RANK=")]
        if ranks:
            pids[int(ranks[0])] = int(proc.name)
    return pids


@pytest.mark.parametrize("deepspeed", [None, "zero2.json"])
def test_kill_9_of_one_rank_fails_the_stage_and_the_rerun_resumes_from_the_last_save(inputs, tmp_path, deepspeed):
    """Under DeepSpeed each rank saves its own ZeRO shard; the rerun loads them all (safetensors, no pickle)."""
    deepspeed = str(DOMAINS.parent / "infra/deepspeed" / deepspeed) if deepspeed else None
    job = tmp_path / "job"
    states = tmp_path / "stages"

    def kill_rank_one_after_a_save() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            saved = sorted(states.glob("pretrain-*/checkpoints/step-*/trainer_state.json"))
            if saved and (pids := rank_pids(job / "spec.json")).get(1):
                os.kill(pids[1], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_one_after_a_save)
    killer.start()
    with pytest.raises(StageFailed, match="failed") as failure:
        launch(inputs, states, max_steps=400, save_every=5, deepspeed=deepspeed, distributed=TWO_RANKS, job_dir=job)
    killer.join()
    assert "failed on local rank 1 (killed by signal 9 (SIGKILL))" in str(failure.value), str(failure.value)
    saved_step = int(sorted(states.glob("pretrain-*/checkpoints/step-*"))[-1].name.split("-")[1])
    assert 0 < saved_step < 400

    rerun = launch(inputs, states, max_steps=400, save_every=5, deepspeed=deepspeed, distributed=TWO_RANKS,
                   job_dir=job)
    assert rerun.world_size == 2
    latest = max(job.glob("logs/*/attempt_0/0/stderr.log"), key=lambda p: p.stat().st_mtime)  # the rerun's
    rank0_log = latest.read_text()
    resumed = re.search(r"resuming pretrain from .* \(step (\d+) of 400\)", rank0_log)
    assert resumed and int(resumed.group(1)) >= saved_step, rank0_log[-2000:]
    print(f"killed after step {saved_step} was saved; the rerun resumed at step {resumed.group(1)}")


def test_a_rank_that_lost_its_peers_is_not_named_as_the_cause(tmp_path):
    """torchrun calls the earliest failure the root cause; a rank whose collective broke because its peer was
    SIGKILLed writes its error file before torchrun notices the kill, so the summary must be read, not trusted."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {"message": "RuntimeError: [gloo/pair.cc:537] Read error "
                                                  "[127.0.0.1]:403: Connection reset by peer",
                                                  "extraInfo": {"timestamp": int(time.time()) - 5}}}))
    summary = ChildFailedError("adaptflow.launch", {
        0: ProcessFailure(local_rank=0, pid=100, exitcode=-15, error_file=str(error_file)),
        1: ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file=str(tmp_path / "none.json")),
    })
    assert "local_rank: 0" in str(summary).rsplit("Root Cause", 1)[1]  # torchrun's pick: the casualty
    assert _root_cause(str(summary)) == ("1", -9)
    # Whatever error the peer's transport reports, a rank killed by a signal it was not sent by the launcher
    # is the cause.
    error_file.write_text(json.dumps({"message": {"message": "RuntimeError: [gloo] unexpected EOF in recv",
                                                  "extraInfo": {"timestamp": int(time.time()) - 5}}}))
    summary = ChildFailedError("adaptflow.launch", {
        0: ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(error_file)),
        1: ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file=str(tmp_path / "none.json")),
    })
    assert _root_cause(str(summary)) == ("1", -9)
    lone = ChildFailedError("adaptflow.launch", {
        0: ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(tmp_path / "none.json"))})
    assert _root_cause(str(lone)) == ("0", 1)
