"""The one training loop across ranks (gloo on CPU, started by the real torchrun): W ranks × A accumulation
steps take the same steps as one rank accumulating W·A micro-batches, plain torch or under DeepSpeed ZeRO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptflow.train.runtime import free_port
from tests.conftest import ROOT

WORKER = Path(__file__).with_name("distributed_worker.py")


def run(out: Path, *, ranks: int, accum: int = 1, zero_stage: int | None = None, steps: int = 4,
        states: Path | None = None, crash_at: int | None = None) -> tuple[list[float], dict]:
    """Losses and consolidated final weights of one worker run; its `start` step is in `run.last`."""
    args = [str(out), f"--accum={accum}", f"--steps={steps}"]
    args += [f"--zero={zero_stage}"] * (zero_stage is not None) + [f"--states={states}"] * (states is not None)
    args += [f"--crash-at={crash_at}"] * (crash_at is not None)
    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ADAPTFLOW_DEVICE": "cpu"}
    if ranks == 1:
        command = [sys.executable, str(WORKER), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   f"--master-port={free_port()}", "--tee=3", str(WORKER), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    record = json.loads((out / "losses.json").read_text())
    assert record["world_size"] == ranks
    run.last = record
    return record["losses"], load_file(out / "final" / "model.safetensors")


def assert_same_training(a, b, *, rtol=1e-5, atol=1e-6):
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    assert len(losses_a) == len(losses_b) == 4
    assert losses_a == pytest.approx(losses_b, rel=rtol)
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), ranks=1, accum=2)


def test_two_ranks_take_the_steps_of_one_rank_with_twice_the_accumulation(one_rank, tmp_path):
    assert_same_training(one_rank, run(tmp_path, ranks=2, accum=1))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_on_two_ranks_takes_the_same_steps(one_rank, tmp_path, zero_stage):
    assert_same_training(one_rank, run(tmp_path, ranks=2, accum=1, zero_stage=zero_stage))


def test_zero3_consolidation_round_trips_the_weights_exactly(tmp_path):
    """Weights partitioned over 2 ranks and gathered into one HF checkpoint come back bit for bit."""
    _, consolidated = run(tmp_path, ranks=2, zero_stage=3, steps=0)
    initial = load_file(tmp_path / "initial.safetensors")
    assert consolidated and set(consolidated) <= set(initial)
    for name, tensor in consolidated.items():
        assert torch.equal(tensor, initial[name]), name


@pytest.mark.parametrize("zero_stage", [None, 2, 3])
def test_a_crashed_run_resumes_from_its_last_save_and_ends_where_an_unbroken_one_does(tmp_path, zero_stage):
    """Optimizer state, step and data position all come back: the resumed run's steps 3-4 and final weights
    equal an uninterrupted run's exactly. DeepSpeed's shards are written as safetensors (no pickle)."""
    unbroken = run(tmp_path / "unbroken", ranks=2, zero_stage=zero_stage)
    states = tmp_path / "states"
    run(tmp_path / "crashed", ranks=2, zero_stage=zero_stage, states=states, crash_at=3)
    assert [p.name for p in states.glob("step-*")] == ["step-0000002"]
    if zero_stage is not None:
        shards = sorted(p.name for p in (states / "step-0000002").glob("*optim_states.pt"))
        assert len(shards) == 2
        assert all((states / "step-0000002" / s).read_bytes()[8:9] == b"{" for s in shards)  # safetensors header
    losses, weights = run(tmp_path / "resumed", ranks=2, zero_stage=zero_stage, states=states)
    assert run.last["start"] == 2
    assert losses == unbroken[0][2:]
    for name, tensor in unbroken[1].items():
        assert torch.equal(weights[name], tensor), name


def test_the_gpu_throughput_benchmark_runs_end_to_end_in_its_smoke_mode():
    """bench/gpu_throughput.py is run on a lent GPU only; its smoke mode keeps it working in between."""
    script = ROOT / "bench/gpu_throughput.py"
    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ADAPTFLOW_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, str(script), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = dict(pair.split("=") for pair in done.stdout.strip().splitlines()[-1].split())
    assert float(numbers["tokens_per_s"]) > 0 and 0 < float(numbers["mfu"]) < 1
