"""The stage contract: what every module under `adaptflow/stages/` provides, and what its caller gives it.

A stage module has

    NAME           its name in the registry, the build and MLflow (e.g. "pretrain")
    Config         its recipe section (a pydantic `Section`; training stages derive from `Optimization`)
    Inputs         a `Record` of what it reads: `CheckpointRef`s, `DatasetRef`s, `TaskSplits`, and, where a stage
                   consumes another stage's settings, those settings (never objects)
    Result         a `Record` of what it hands on (a checkpoint and metrics, a dataset, an evaluation report)
    cache_key(config, inputs, seed) -> str
                   equal keys, equal results: the build reuses a finished run with the same key
    run(config, inputs, env) -> Result
                   the stage itself; under a launcher every rank calls it

and two flags: `DISTRIBUTED` (it may run on the recipe's ranks, every rank calling `run`) and `REUSABLE` (a
finished run with the same cache key is reused instead of recomputed). Optionally

    contribution(config, result) -> Contribution | None
                   what the stage added, as one measure of its input and of its output (a build prints it per
                   stage, so each stage of a chain shows that it earns its place)
    check_recipe(recipe) -> None
                   what the stage needs of the rest of the recipe; raises ValueError when loading the recipe
    check_data(recipe, corpora, tasks) -> list[str]
                   what the stage needs of the prepared data (e.g. at least a batch of it), as problems with their
                   fixes; the build refuses to start training while any stage has one
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from adaptflow.data.tokens import TokenStore
from adaptflow.refs import Record
from adaptflow.train.loop import MetricsSink
from adaptflow.train.runtime import SINGLE, Runtime

CONTRACT = ("NAME", "Config", "Inputs", "Result", "cache_key", "run")


@dataclass(frozen=True)
class StageEnv(Record):
    """What every stage needs from whoever calls it — a Prefect task, a launched rank, a notebook.

    `work_dir`: where stages keep their directories (a stage writes `work_dir/<NAME>-<cache key>/`, so a rerun
    with the same inputs finds its saves); `data_dir`: where datasets a stage writes go (content-addressed, shared
    by builds); `cache_dir`: tokenised corpora, shared by stages and builds. `seed`: the seed this run uses.
    `runtime` (this process's rank) and `log_metrics` (rank 0's metric sink) are this process's own and never
    travel to a launched stage's ranks; each rank makes its own.
    """

    work_dir: str | Path
    data_dir: str | Path | None = None
    cache_dir: str | Path | None = None
    seed: int = 0
    deepspeed: str | dict | None = None  # a DeepSpeed JSON config (path or dict): ZeRO under the same loop
    trust_remote_code: bool = False
    checkpoint_mirror: str | None = None  # s3://… or a path: resumable saves copied there too
    resume: bool = True  # False: a forced recompute starts from step 0 and drops earlier saves
    progress: bool = False
    mlflow_run_id: str | None = None
    build_run_id: str | None = None
    runtime: Runtime = field(default=SINGLE, metadata={"local": True})
    log_metrics: MetricsSink | None = field(default=None, metadata={"local": True}, repr=False)

    def to_dict(self) -> dict:
        """The part of the environment that travels to a launched stage's ranks."""
        return {k: v for k, v in super().to_dict().items() if not _is_local(k)}

    def stage_dir(self, name: str, key: str) -> Path:
        return Path(self.work_dir) / f"{name}-{key}"

    @property
    def token_store(self) -> TokenStore:
        """Tokenised corpora: under `cache_dir` (a folder or an s3:// prefix), else `work_dir/tokens`."""
        root = self.cache_dir if self.cache_dir is not None else Path(self.work_dir) / "tokens"
        return TokenStore(root, cache_dir=Path(self.work_dir) / "shard-cache")

    @property
    def datasets_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else Path(self.work_dir) / "datasets"

    @property
    def metrics(self) -> MetricsSink:
        """Where this process logs metrics: rank 0's sink, a no-op on every other rank (or without one)."""
        if self.log_metrics is None or not self.runtime.is_main:
            return _no_metrics
        return self.log_metrics

    def on_rank(self, runtime: Runtime, log_metrics: MetricsSink | None) -> StageEnv:
        return dataclasses.replace(self, runtime=runtime, log_metrics=log_metrics)


@dataclass(frozen=True)
class Contribution:
    """One measure of a stage's input (`before`; None where the input cannot be measured so, e.g. a language
    model scored as a classifier) and of its output (`after`)."""

    measure: str  # e.g. "kitchen test accuracy (source-only reference → adapted)"
    before: float | None
    after: float
    higher_is_better: bool = True

    @property
    def gain(self) -> float | None:
        if self.before is None:
            return None
        return (self.after - self.before) * (1 if self.higher_is_better else -1)


def batch_problems(batch_size: int, setting: str, rows: dict[str, int]) -> list[str]:
    """A problem for each training set (what → rows after splitting) smaller than a batch, with its fix."""
    return [f"{what}: {n} training record(s) after splitting, fewer than a batch ({batch_size}); lower {setting} "
            "or give more data" for what, n in rows.items() if n < batch_size]


def check_stage(module: ModuleType) -> ModuleType:
    """`module` if it keeps the stage contract; a `TypeError` naming what it lacks otherwise."""
    missing = [name for name in CONTRACT if not hasattr(module, name)]
    for record in ("Inputs", "Result"):
        if hasattr(module, record) and not issubclass(getattr(module, record), Record):
            missing.append(f"{record} (a Record)")
    if missing:
        raise TypeError(f"stage module {module.__name__} lacks {', '.join(missing)}: every stage has "
                        f"{', '.join(CONTRACT)} (see adaptflow/stages/contract.py)")
    return module


def _is_local(name: str) -> bool:
    return any(f.name == name and f.metadata.get("local") for f in dataclasses.fields(StageEnv))


def _no_metrics(step: int, metrics: dict[str, float]) -> None:
    pass
