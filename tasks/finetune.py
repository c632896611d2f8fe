"""Task fine-tuning as Prefect tasks: one MLflow child run per seed, then seed selection and aggregation."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages.finetune import (
    STAGE,
    FinetuneResult,
    aggregate_seeds,
    choose_seed,
    finetune_cache_key,
    run_finetune,
)
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import BuildContext, record_checkpoint, run_or_reuse, stage_run, stage_task
from tasks.prepare import PreparedInputs


@stage_task("finetune", task_run_name="finetune-seed{seed}")
def finetune(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs, seed: int) -> FinetuneResult:
    config = ctx.recipe.stages.finetune
    splits = data.tasks[config.task]
    fisher = None
    if config.regularizer is not None and config.regularizer.fisher_corpus != "task":
        fisher = data.corpora[config.regularizer.fisher_corpus].train
    tags = {
        "adaptflow.cache_key": finetune_cache_key(config, base, splits, seed),
        "adaptflow.input_checkpoint.uri": base.uri,
        "adaptflow.input_checkpoint.digest": base.digest,
        "adaptflow.task": config.task,
        "adaptflow.seed": seed,
    }
    params = config.model_dump(mode="json", exclude={"seeds"}) | {"seed": seed, "kind": splits.kind}
    with stage_run(ctx, f"{STAGE}-seed{seed}", params=params, tags=tags) as (client, run_id):
        for split in ("train", "validation", "test"):
            if (ref := getattr(splits, split)) is not None:
                log_dataset(client, run_id, ref, context=split)
        arguments = dict(
            task=splits, base=base, work_dir=ctx.workdir / "stages", seed=seed, fisher_data=fisher,
            mlflow_run_id=run_id, build_run_id=ctx.build_run_id, trust_remote_code=ctx.recipe.model.trust_remote_code,
        )
        result, prior = run_or_reuse(ctx, STAGE, run_finetune, config, arguments, from_json=FinetuneResult.from_dict,
                                     client=client, run_id=run_id, key=tags["adaptflow.cache_key"], inputs=[base])
        if prior is None:
            metrics_logger(client, run_id)(int(result.metrics["steps"]), result.metrics)
            for report in result.reports:
                client.log_artifact(run_id, report, artifact_path="reports")
        record_checkpoint(client, run_id, result.checkpoint, prior=prior)
        return result


@stage_task("select-seed")
def select_seed(ctx: BuildContext, results: list[FinetuneResult]) -> CheckpointRef:
    """Log mean ± std of every metric over seeds on the build run; pass on the chosen seed's checkpoint."""
    config = ctx.recipe.stages.finetune
    summary = aggregate_seeds(results)
    chosen = choose_seed(results, config.select_seed)
    summary |= {"finetune.selected_seed": chosen.seed}
    metrics_logger(ctx.tracking.client(), ctx.build_run_id)(0, summary)
    client = ctx.tracking.client()
    client.set_tag(ctx.build_run_id, "adaptflow.finetune.selected_run_id", chosen.checkpoint.mlflow_run_id)
    client.set_tag(ctx.build_run_id, "adaptflow.finetune.selection",
                   f"{chosen.selection_mode} val_{chosen.selection_metric}")
    return chosen.checkpoint
