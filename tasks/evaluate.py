"""Evaluation as a Prefect task: perplexity of the base model vs the build's model, per evaluation corpus."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaptflow.evaluate import compare_perplexity
from adaptflow.models import infer_objective
from adaptflow.refs import CheckpointRef, EvalReport
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import RETRIES, RETRY_DELAYS, BuildContext, retry_transient, stage_run
from tasks.prepare import PreparedInputs


@task(name="evaluate", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate(
    ctx: BuildContext, base: CheckpointRef, candidate: CheckpointRef, data: PreparedInputs
) -> EvalReport:
    config = ctx.recipe.evaluation
    pretrain = ctx.recipe.stages.pretrain
    objective = pretrain.objective if pretrain and pretrain.objective != "auto" else infer_objective(base.uri)
    corpora = {name: data.corpora[name].validation for name in config.corpora}
    tags = {"adaptflow.base.digest": base.digest, "adaptflow.candidate.uri": candidate.uri,
            "adaptflow.candidate.digest": candidate.digest}
    with stage_run(ctx, "evaluate", params=config.model_dump(mode="json"), tags=tags) as (client, run_id):
        for name, ref in corpora.items():
            log_dataset(client, run_id, ref, context=f"eval/{name}")
        metrics = compare_perplexity(
            base,
            candidate,
            corpora,
            objective=objective,
            block_size=config.block_size,
            max_blocks=config.max_blocks,
            batch_size=config.batch_size,
            pseudo_tokens=config.pseudo_perplexity_tokens,
            cache_dir=ctx.cache_dir,
            seed=ctx.recipe.seed,
        )
        metrics_logger(client, run_id)(0, metrics)
        metrics_logger(client, ctx.build_run_id)(0, metrics)
        return EvalReport(metrics=metrics, passed=True)
