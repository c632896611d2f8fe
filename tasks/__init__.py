"""Prefect tasks: one file per stage, each thin — MLflow child run, call the engine, return a reference.

Only transient failures (network, S3, tracking server) are retried; a config error, a data error or an
out-of-memory fails at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adaptflow.config import Recipe
from adaptflow.refs import CheckpointRef
from adaptflow.reuse import STAGE_ORDER
from adaptflow.storage import StorageUnavailable
from adaptflow.tracking import TrackingTarget, end_run, flatten, log_params, start_run

RETRIES = 2
RETRY_DELAYS = [5, 30]

COMPUTE_SECONDS = "compute_seconds"  # a stage's own work (training, evaluation), without tracking and uploads
log = logging.getLogger("adaptflow.reuse")


@dataclass(frozen=True)
class BuildContext:
    """What every task of one build needs: the validated recipe and where to track. Small and frozen."""

    recipe: Recipe
    tracking: TrackingTarget
    experiment_id: str
    build_run_id: str
    progress: bool = False
    reuse: bool = True  # reuse finished stages with the same cache key
    recompute_from: str | None = None  # …except this stage and those after it (a rerun's --from)

    def may_reuse(self, stage: str) -> bool:
        if not self.reuse:
            return False
        return self.recompute_from is None or STAGE_ORDER.index(stage) < STAGE_ORDER.index(self.recompute_from)

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
                          distributed=distributed, job_dir=Path(arguments["work_dir"]).parent / "launch" / f"{stage}-{key}",
                          tracking={"uri": ctx.tracking.uri, "run_id": run_id})
    client.set_tag(run_id, "adaptflow.world_size", result.pop("world_size"))
    return from_json(result)


def run_or_reuse(ctx: BuildContext, stage: str, run, config, arguments: dict, *, from_json, client, run_id: str,
                 key: str, inputs: list[CheckpointRef]):
    """The result of an earlier finished run with the same cache key when the build may reuse `stage`, else
    `run_or_launch`'s (its result then recorded for later reuse). Returns `(result, prior)`; `prior` is the
    reused run (a `PriorRun`) or None. A reused run is tagged `adaptflow.reused_from` and carries its metrics."""
    from adaptflow.reuse import REUSED_FROM, find_reusable, localise, record_result
    from adaptflow.tracking import metrics_logger

    with claimed_work_dir(ctx, stage, key) as work_dir:
        client.set_tag(run_id, "adaptflow.work_dir", str(work_dir / f"{stage}-{key}"))
        if ctx.may_reuse(stage) and (prior := find_reusable(client, ctx.experiment_id, key)) is not None:
            try:
                localised = localise(client, prior, work_dir / f"{stage}-{key}", inputs=[ref.to_dict() for ref in inputs])
            except (OSError, ValueError) as err:
                log.warning("%s: run %s has the same cache key but cannot be reused (%s): computing it", stage,
                            prior.run_id, err)
            else:
                log.info("%s: reusing run %s (cache key %s)", stage, prior.run_id, key)
                client.set_tag(run_id, REUSED_FROM, prior.run_id)
                metrics_logger(client, run_id)(0, prior.metrics | {COMPUTE_SECONDS: 0.0})  # nothing computed here
                return from_json(localised), prior
        arguments = arguments | {"work_dir": work_dir}
        if stage == "pretrain":  # the only stage with resumable saves: a forced recompute starts from step 0
            arguments |= {"resume": ctx.may_reuse(stage)}
        started = time.perf_counter()
        result = run_or_launch(ctx, stage, run, config, arguments, from_json=from_json, client=client, run_id=run_id,
                               key=key)
    client.log_metric(run_id, COMPUTE_SECONDS, time.perf_counter() - started)
    record_result(client, run_id, jsonable(dataclasses.asdict(result)))
    return result, None


@contextmanager
def claimed_work_dir(ctx: BuildContext, stage: str, key: str) -> Iterator[Path]:
    """Where `stage` (with cache key `key`) writes: the shared `stages/` folder, where a rerun finds the saves of a
    killed run to resume from, or, while another live build is running the same stage with the same inputs, a
    folder of this build's own, so the two never write into one directory.

    The claim is an exclusive `flock` on `stages/.<stage>-<key>.lock`, held for the stage's duration; the kernel
    drops it when the holder dies, so a killed build never blocks the next."""
    import fcntl

    shared = ctx.workdir / "stages"
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / f".{stage}-{key}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            private = ctx.workdir / "builds" / ctx.build_run_id / "stages"
            log.warning("%s: another build is running this stage with the same inputs (cache key %s) in %s; this "
                        "build works in %s instead", stage, key, shared, private)
            yield private
            return
        try:
            yield shared
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_checkpoint(client, run_id: str, checkpoint: CheckpointRef, *, prior, upload: str | None = None) -> None:
    """Tag the stage run with the checkpoint it passes on (where it is, its digest, its logged copy: reuse and
    lineage read these) and log `upload` (default: that checkpoint) as the run's `checkpoint` artifact. A reused
    checkpoint is not uploaded again: its artifact is the earlier run's."""
    from adaptflow.tracking import log_directory

    upload = upload or checkpoint.uri
    artifact_uri = prior.artifact_uri if prior is not None else log_directory(client, run_id, upload, "checkpoint")
    client.set_tag(run_id, "adaptflow.checkpoint.uri", checkpoint.uri)
    client.set_tag(run_id, "adaptflow.checkpoint.artifact_uri", artifact_uri if upload == checkpoint.uri else "")
    client.set_tag(run_id, "adaptflow.checkpoint.digest", checkpoint.digest)


def is_transient(error: BaseException | None) -> bool:
    """Network-ish failures worth a retry — S3 or the tracking server unreachable, timing out or answering 5xx —
    found anywhere in the error's cause chain; never a config, data or out-of-memory error."""
    from mlflow.exceptions import RestException
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout as RequestsTimeout

    from adaptflow.errors import AdaptflowError

    transient: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, StorageUnavailable,
                                                  RequestsConnectionError, RequestsTimeout)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError

        transient += (BotoConnectionError,)
    except ImportError:
        pass
    if error is None or isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return False
    if isinstance(error, AdaptflowError) and not isinstance(error, StorageUnavailable):
        return False  # the user's to fix: retrying cannot help
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, transient):
            return True
        if isinstance(error, RestException) and str(error.error_code) in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR"}:
            return True  # the tracking server answered 503 / 500
        error = error.__cause__ or error.__context__
    return False


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


def stage_task(name: str, **options):
    """`@task` for a build step: retried only on transient errors (twice, after 5 s then 30 s); never cached by
    Prefect, since adaptflow reuses finished stages itself, by cache key (`run_or_reuse`)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name=name, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
                cache_policy=NO_CACHE, **options)
