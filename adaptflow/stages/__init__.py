"""The build's stages, one module each, under one contract (`adaptflow.stages.contract`).

`STAGES` below, in the order stages run, is the only list of them: the recipe's `stages:` sections, stage reuse
and `rerun --from`, the CLI and the launcher all read it. A stage runs in this process as

    from adaptflow.stages import pretrain
    result = pretrain.run(config, pretrain.Inputs(base=..., train=...), StageEnv(work_dir="runs/stages"))

or on many ranks with `adaptflow.launch.run_stage` (every rank runs `python -m adaptflow.stages SPEC.json`).

Adding a stage: write `stages/<name>.py` keeping the contract, add it to `STAGES` at its place in the order,
give it a Prefect task (`tasks/<name>.py`) and call that task in `flows/build.py` (DESIGN.md walks through it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from adaptflow.stages.contract import CONTRACT, Contribution, StageEnv, check_stage

# name -> module, in the order the stages run
STAGES: dict[str, str] = {
    "curate": "adaptflow.stages.curate",
    "pretrain": "adaptflow.stages.pretrain",
    "adapt": "adaptflow.stages.adapt",
    "self_instruct": "adaptflow.stages.self_instruct",
    "active_learning": "adaptflow.stages.active_learning",
    "finetune": "adaptflow.stages.finetune",
    "evaluate": "adaptflow.stages.evaluate",
}


def names() -> list[str]:
    """Every stage's name, in the order stages run."""
    return list(STAGES)


def get(name: str) -> ModuleType:
    """The module of stage `name` (imported on first use)."""
    if name not in STAGES:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGES)}")
    return check_stage(importlib.import_module(STAGES[name]))


def register(name: str, module: str, *, after: str | None = None) -> None:
    """Add a stage kept outside this package (a plugin, a test) to the registry, after stage `after` (default:
    last). The module must keep the contract; launched ranks import it by the same name."""
    if name in STAGES:
        raise ValueError(f"a stage named {name!r} is registered already ({STAGES[name]})")
    check_stage(importlib.import_module(module))
    order = list(STAGES.items())
    place = len(order) if after is None else [n for n, _ in order].index(after) + 1
    order.insert(place, (name, module))
    STAGES.clear()
    STAGES.update(order)


def unregister(name: str) -> None:
    STAGES.pop(name, None)


def comes_before(stage: str, other: str) -> bool:
    """Whether `stage` runs before `other` in a build."""
    order = names()
    return order.index(stage) < order.index(other)


__all__ = ["CONTRACT", "STAGES", "Contribution", "StageEnv", "check_stage", "comes_before", "get", "names", "register", "unregister"]
