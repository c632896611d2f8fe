"""Task fine-tuning as Prefect tasks (`adaptflow.stages.finetune`): one MLflow child run per seed, then seed
selection and aggregation."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages import finetune as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run
from adaptflow.tracking.runs import metrics_logger


@stage_task("finetune", task_run_name="finetune-seed{seed}")
def finetune(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs, seed: int) -> stage.Result:
    config = ctx.recipe.stages.finetune
    splits = data.tasks[config.task]
    fisher = None
    if config.regularizer is not None and config.regularizer.fisher_corpus != "task":
        fisher = data.corpora[config.regularizer.fisher_corpus].train
    inputs = stage.Inputs(base=base, task=splits, fisher=fisher)
    params = config.model_dump(mode="json", exclude={"seeds"}) | {"seed": seed, "kind": splits.kind}
    tags = {"adaptflow.task": config.task, "adaptflow.seed": seed}
    with stage_run(ctx, stage, config, inputs, seed=seed, name=f"{stage.NAME}-seed{seed}", params=params,
                   tags=tags) as run:
        result = run.result
        if run.prior is None:
            run.log_metrics(int(result.metrics["steps"]), result.metrics)
            for report in result.reports:
                run.client.log_artifact(run.run_id, report, artifact_path="reports")
        run.record_checkpoint(result.checkpoint)
        return result


@stage_task("select-seed")
def select_seed(ctx: BuildContext, results: list[stage.Result]) -> CheckpointRef:
    """Log mean ± std of every metric over seeds on the build run; pass on the chosen seed's checkpoint."""
    config = ctx.recipe.stages.finetune
    summary = stage.aggregate_seeds(results)
    chosen = stage.choose_seed(results, config.select_seed)
    summary |= {"finetune.selected_seed": chosen.seed}
    client = ctx.tracking.client()
    metrics_logger(client, ctx.build_run_id)(0, summary)
    client.set_tag(ctx.build_run_id, "adaptflow.finetune.selected_run_id", chosen.checkpoint.mlflow_run_id)
    client.set_tag(ctx.build_run_id, "adaptflow.finetune.selection",
                   f"{chosen.selection_mode} val_{chosen.selection_metric}")
    return chosen.checkpoint
