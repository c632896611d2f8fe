"""How a stage runs inside a build, the same way for every stage:

    with stage_run(ctx, pretrain, config, inputs) as run:      # run.result: the stage's Result
        run.record_checkpoint(run.result.checkpoint)

opens the stage's MLflow child run (its config as params; its cache key and input checkpoint as tags; every
dataset of its inputs as a dataset input), then gives the result of an earlier finished run with the same cache key
when the build may reuse it, or computes it — in this process, or on the recipe's ranks — in a work directory this
build has claimed, and records it for later reuse, with what the stage contributed (its `contribution`, when it
has one). The run is marked FAILED if anything in the block raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from adaptflow.launch import run_stage
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.stages import Contribution, StageEnv
from adaptflow.tasks.context import BuildContext
from adaptflow.tracking.reuse import REUSED_FROM, PriorRun, find_reusable, localise, record_result
from adaptflow.tracking.runs import end_run, flatten, log_dataset, log_directory, log_params, metrics_logger, start_run
from adaptflow.train.engine import zero_stage_of

COMPUTE_SECONDS = "compute_seconds"  # a stage's own work (training, evaluation), without tracking and uploads
log = logging.getLogger("adaptflow.reuse")


@dataclass(frozen=True)
class StageRun:
    client: object  # MlflowClient
    run_id: str
    result: Record
    prior: PriorRun | None  # the finished run whose result was reused, or None when computed here

    def log_metrics(self, step: int, metrics: dict[str, float], *, on: str | None = None) -> None:
        """Log `metrics` on this run (or on run `on`, e.g. the build's)."""
        metrics_logger(self.client, on or self.run_id)(step, metrics)

    def log_dataset(self, ref: DatasetRef, *, context: str) -> None:
        log_dataset(self.client, self.run_id, ref, context=context)

    def record_checkpoint(self, checkpoint: CheckpointRef, *, upload: str | None = None) -> None:
        """Tag the run with the checkpoint it passes on (where it is, its digest, its logged copy: reuse and
        lineage read these) and log `upload` (default: that checkpoint) as the run's `checkpoint` artifact. A
        reused checkpoint is not uploaded again: its artifact is the earlier run's."""
        upload = upload or checkpoint.uri
        if self.prior is not None:
            artifact_uri = self.prior.artifact_uri
        else:
            artifact_uri = log_directory(self.client, self.run_id, upload, "checkpoint")
        self.client.set_tag(self.run_id, "adaptflow.checkpoint.uri", checkpoint.uri)
        self.client.set_tag(self.run_id, "adaptflow.checkpoint.artifact_uri",
                            artifact_uri if upload == checkpoint.uri else "")
        self.client.set_tag(self.run_id, "adaptflow.checkpoint.digest", checkpoint.digest)


@contextmanager
def stage_run(ctx: BuildContext, stage: ModuleType, config, inputs: Record, *, seed: int | None = None,
              name: str | None = None, params: dict | None = None, tags: dict | None = None) -> Iterator[StageRun]:
    """Stage `stage` of the build on `inputs` (seed: the recipe's unless given), inside its MLflow child run
    `name` (default: the stage's name)."""
    seed = ctx.recipe.seed if seed is None else seed
    key = stage.cache_key(config, inputs, seed)
    references = inputs.references()
    checkpoints = [ref for _, ref in references if isinstance(ref, CheckpointRef)]
    tags = {"adaptflow.cache_key": key, **(tags or {})}
    if checkpoints:
        tags |= {"adaptflow.input_checkpoint.uri": checkpoints[0].uri,
                 "adaptflow.input_checkpoint.digest": checkpoints[0].digest}
    params = config.model_dump(mode="json") | {"seed": seed} if params is None else params
    with child_run(ctx, name or stage.NAME, params=params, tags=tags) as (client, run_id):
        for context, ref in references:
            if isinstance(ref, DatasetRef):
                log_dataset(client, run_id, ref, context=context)
        result, prior = _reused_or_computed(ctx, stage, config, inputs, seed=seed, key=key, client=client,
                                            run_id=run_id, checkpoints=checkpoints)
        if hasattr(stage, "contribution") and (contribution := stage.contribution(config, result)) is not None:
            record_contribution(client, run_id, contribution)
        yield StageRun(client, run_id, result, prior)


def _reused_or_computed(ctx: BuildContext, stage: ModuleType, config, inputs: Record, *, seed: int, key: str, client,
                        run_id: str, checkpoints: list[CheckpointRef]) -> tuple[Record, PriorRun | None]:
    with claimed_work_dir(ctx, stage.NAME, key) as work_dir:
        stage_dir = work_dir / f"{stage.NAME}-{key}"
        client.set_tag(run_id, "adaptflow.work_dir", str(stage_dir))
        if stage.REUSABLE and ctx.may_reuse(stage.NAME) and (prior := find_reusable(client, ctx.experiment_id,
                                                                                     key)) is not None:
            try:
                localised = localise(client, prior, stage_dir, inputs=[ref.to_dict() for ref in checkpoints])
            except (OSError, ValueError) as err:
                log.warning("%s: run %s has the same cache key but cannot be reused (%s): computing it", stage.NAME,
                            prior.run_id, err)
            else:
                log.info("%s: reusing run %s (cache key %s)", stage.NAME, prior.run_id, key)
                client.set_tag(run_id, REUSED_FROM, prior.run_id)
                metrics_logger(client, run_id)(0, prior.metrics | {COMPUTE_SECONDS: 0.0})  # nothing computed here
                return stage.Result.from_dict(localised), prior
        recipe = ctx.recipe
        env = StageEnv(work_dir=work_dir, data_dir=ctx.datasets_dir, cache_dir=ctx.cache_dir, seed=seed,
                       deepspeed=recipe.distributed.deepspeed, trust_remote_code=recipe.model.trust_remote_code,
                       checkpoint_mirror=recipe.checkpoint_mirror, resume=ctx.may_reuse(stage.NAME),
                       progress=ctx.progress, mlflow_run_id=run_id, build_run_id=ctx.build_run_id,
                       log_metrics=metrics_logger(client, run_id))
        started = time.perf_counter()
        ran = run_stage(stage, config, inputs, env, distributed=recipe.distributed,
                        job_dir=work_dir.parent / "launch" / f"{stage.NAME}-{key}",
                        tracking={"uri": ctx.tracking.uri, "run_id": run_id})
    client.log_metric(run_id, COMPUTE_SECONDS, time.perf_counter() - started)
    if stage.DISTRIBUTED:
        distributed = recipe.distributed
        zero_stage = zero_stage_of(distributed.deepspeed)
        client.set_tag(run_id, "adaptflow.distributed", distributed.launcher)
        client.set_tag(run_id, "adaptflow.deepspeed", distributed.deepspeed or "")
        client.set_tag(run_id, "adaptflow.zero_stage", "" if zero_stage is None else zero_stage)
        client.set_tag(run_id, "adaptflow.world_size", ran.world_size)
    if stage.REUSABLE:
        record_result(client, run_id, ran.result.to_dict())
    return ran.result, None


def record_contribution(client, run_id: str, contribution: Contribution) -> None:
    """`contribution_before` / `_after` / `_gain` metrics (no before, no gain) and the measure as tag
    `adaptflow.contribution`: what the build summary prints per stage."""
    metrics = {"contribution_after": contribution.after}
    if contribution.before is not None:
        metrics |= {"contribution_before": contribution.before, "contribution_gain": contribution.gain}
    metrics_logger(client, run_id)(0, metrics)
    client.set_tag(run_id, "adaptflow.contribution", contribution.measure)


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


@contextmanager
def child_run(ctx: BuildContext, name: str, *, params: dict, tags: dict | None = None) -> Iterator[tuple]:
    """An MLflow child run of the build (`name`, e.g. a stage's); marked FAILED if the body raises."""
    client = ctx.tracking.client()
    run_id = start_run(
        client,
        ctx.experiment_id,
        name,
        tags={"adaptflow.stage": name, "adaptflow.domain": ctx.recipe.domain, **(tags or {})},
        parent_run_id=ctx.build_run_id,
    )
    try:
        log_params(client, run_id, flatten(params))
        yield client, run_id
    except BaseException:
        end_run(client, run_id, failed=True)
        raise
    end_run(client, run_id)
