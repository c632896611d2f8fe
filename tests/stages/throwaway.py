"""A throwaway stage, kept outside the engine, that the contract tests register: it reads a dataset reference and
sums `value × (rank + 1)` over the ranks that run it, so a result says how many ranks computed it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptflow.config import PositiveInt, Section
from adaptflow.lineage import stage_cache_key
from adaptflow.refs import DatasetRef, Record
from adaptflow.stages import StageEnv

NAME = "throwaway"
DISTRIBUTED = True
REUSABLE = False


class Config(Section):
    enabled: bool = True
    value: PositiveInt = 1


@dataclass(frozen=True)
class Inputs(Record):
    data: DatasetRef


@dataclass(frozen=True)
class Result(Record):
    total: int
    world_size: int
    rows: int


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, seed)


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    total = env.runtime.all_reduce_sum(torch.tensor(config.value * (env.runtime.rank + 1)))
    env.metrics(0, {"total": float(total)})
    return Result(total=int(total), world_size=env.runtime.world_size, rows=inputs.data.rows)
