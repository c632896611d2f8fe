"""Prefect tasks: one file per stage, each thin — MLflow child run, call the engine, return a reference.

Only transient failures (network, S3, tracking server) are retried; a config error, a data error or an
out-of-memory fails at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adaptflow.config import Recipe
from adaptflow.storage import StorageUnavailable
from adaptflow.tracking import TrackingTarget, end_run, flatten, log_params, start_run

RETRIES = 2
RETRY_DELAYS = [5, 30]


@dataclass(frozen=True)
class BuildContext:
    """What every task of one build needs: the validated recipe and where to track. Small and frozen."""

    recipe: Recipe
    tracking: TrackingTarget
    experiment_id: str
    build_run_id: str
    progress: bool = False

    @property
    def workdir(self) -> Path:
        return Path(self.recipe.workdir).resolve()

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache" / "tokens"


def jsonable(arguments: dict) -> dict:
    """Stage arguments as JSON for a launched stage: references as dicts, paths as strings."""
    def convert(value):
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        return str(value) if isinstance(value, Path) else value

    return {name: convert(value) for name, value in arguments.items()}


def run_or_launch(ctx: BuildContext, stage: str, run, config, arguments: dict, *, from_json, client, run_id: str,
                  key: str):
    """Run a training stage in this process, or launch it on the recipe's ranks (`distributed:`).

    `run(config, **arguments, …)` is the stage function; `from_json` rebuilds its result from a launched
    stage's JSON. Tags the MLflow run with how it ran.
    """
    from adaptflow.distributed import zero_stage_of
    from adaptflow.launch import launch_stage
    from adaptflow.tracking import metrics_logger

    distributed = ctx.recipe.distributed
    arguments = arguments | {"deepspeed": distributed.deepspeed}
    zero_stage = zero_stage_of(distributed.deepspeed)
    client.set_tag(run_id, "adaptflow.distributed", distributed.launcher)
    client.set_tag(run_id, "adaptflow.deepspeed", distributed.deepspeed or "")
    client.set_tag(run_id, "adaptflow.zero_stage", "" if zero_stage is None else zero_stage)
    if distributed.launcher == "none":
        client.set_tag(run_id, "adaptflow.world_size", 1)
        return run(config, **arguments, log_metrics=metrics_logger(client, run_id), progress=ctx.progress)
    result = launch_stage(stage, {"config": config.model_dump(mode="json")} | jsonable(arguments),
                          distributed=distributed, job_dir=ctx.workdir / "launch" / f"{stage}-{key}",
                          tracking={"uri": ctx.tracking.uri, "run_id": run_id})
    client.set_tag(run_id, "adaptflow.world_size", result.pop("world_size"))
    return from_json(result)


def is_transient(error: BaseException | None) -> bool:
    """Network-ish failures worth a retry; never config, data, or out-of-memory errors."""
    if error is None or isinstance(error, MemoryError):
        return False
    transient: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, StorageUnavailable)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError

        transient += (BotoConnectionError,)
    except ImportError:
        pass
    if isinstance(error, transient):
        return True
    from mlflow.exceptions import RestException

    return isinstance(error, RestException) and str(getattr(error, "error_code", "")) in {
        "TEMPORARILY_UNAVAILABLE",
        "INTERNAL_ERROR",
    }


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the task failed on a transient error."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


@contextmanager
def stage_run(ctx: BuildContext, stage: str, *, params: dict, tags: dict | None = None) -> Iterator[tuple]:
    """An MLflow child run of the build for one stage; marked FAILED if the body raises."""
    client = ctx.tracking.client()
    run_id = start_run(
        client,
        ctx.experiment_id,
        stage,
        tags={"adaptflow.stage": stage, "adaptflow.domain": ctx.recipe.domain, **(tags or {})},
        parent_run_id=ctx.build_run_id,
    )
    try:
        log_params(client, run_id, flatten(params))
        yield client, run_id
    except BaseException:
        end_run(client, run_id, failed=True)
        raise
    end_run(client, run_id)
