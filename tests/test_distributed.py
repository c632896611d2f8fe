"""The one training loop across ranks (gloo on CPU, started by the real torchrun): W ranks × A accumulation
steps take the same steps as one rank accumulating W·A micro-batches, plain torch or under DeepSpeed ZeRO."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, *, ranks: int, accum: int, zero_stage: int | None = None) -> tuple[list[float], dict]:
    args = [str(out), str(accum)] + ([] if zero_stage is None else [str(zero_stage)])
    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ADAPTFLOW_DEVICE": "cpu"}
    if ranks == 1:
        command = [sys.executable, str(WORKER), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   f"--master-port={free_port()}", str(WORKER), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "losses.json").read_text())
    assert record["world_size"] == ranks
    return record["losses"], load_file(out / "weights.safetensors")


def assert_same_training(a, b, *, rtol=1e-5, atol=1e-6):
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    assert len(losses_a) == len(losses_b) == 4
    assert losses_a == pytest.approx(losses_b, rel=rtol)
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
