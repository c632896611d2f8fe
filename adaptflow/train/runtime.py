"""Ranks and process groups: where this process stands in a launched stage.

Every rank runs the same stage code. `Runtime.from_env()` reads what torchrun and the deepspeed launcher set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process group: gloo on CPU, nccl on CUDA.
Rank r of W takes the sampler's micro-batches r, r + W, r + 2W, …, so W ranks accumulating A micro-batches
see exactly the examples one rank sees accumulating W·A: the global batch (micro × A × W) and the loss are
the same at any world size.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch

from adaptflow.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, *, timeout_minutes: int = 30) -> Runtime:
        """This process's place in the job; joins the process group when the launcher started several ranks
        (or `DeepSpeed` needs one even for one rank)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        runtime = cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
        if world_size > 1:
            runtime.join(timeout_minutes=timeout_minutes)
        return runtime

    def join(self, *, timeout_minutes: int = 30) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            return
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(f"{name} is not set: start the stage with torchrun or the deepspeed launcher, "
                                  "or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("ADAPTFLOW_DEVICE") != "cpu" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all ranks (in place; returned for chaining)."""
        if self.world_size > 1:
            import torch.distributed as dist

            # NCCL reduces GPU tensors only; the loop's counters (targets, tokens, FLOPs) live on the CPU.
            reduced = tensor.to(self.device())
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            if reduced is not tensor:
                tensor.copy_(reduced)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group together (a rank exiting with gloo's group still open can abort:
        "terminate called without an active exception", seen once with ZeRO-3 on 2 ranks)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def exit(self) -> NoReturn:
        """Leave the group, flush, and end the process without C++ teardown. With DeepSpeed on gloo, static
        destructors at interpreter exit abort about one rank exit in four ("terminate called without an
        active exception", SIGABRT after all work and output are done), which would fail a finished stage."""
        self.close()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def device(self) -> torch.device:
        if torch.cuda.is_available() and os.environ.get("ADAPTFLOW_DEVICE", "") != "cpu":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE = Runtime()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
