"""Adversarial domain adaptation as a Prefect task: an MLflow child run around `run_adapt`, with the
negative-transfer guard's decision recorded as tags and metrics."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages.adapt import STAGE, AdaptResult, adapt_cache_key, run_adapt
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import BuildContext, record_checkpoint, run_or_reuse, stage_run, stage_task
from tasks.prepare import PreparedInputs


@stage_task("adapt")
def adapt(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> CheckpointRef:
    """Run DANN; return the adapted checkpoint, or `base` itself when the guard rejects the stage."""
    config = ctx.recipe.stages.adapt
    seed = config.seed if config.seed is not None else ctx.recipe.seed
    source = data.tasks[config.source_task]
    target = data.corpora[config.target_corpus]
    target_labelled = data.tasks[config.target_task] if config.target_task else None
    inputs = [d for d in (source.train, source.validation, target.train, target.validation) if d is not None]
    if target_labelled is not None:
        inputs += [d for d in (target_labelled.train, target_labelled.validation) if d is not None]
    tags = {"adaptflow.cache_key": adapt_cache_key(config, base, inputs, seed),
            "adaptflow.input_checkpoint.uri": base.uri, "adaptflow.input_checkpoint.digest": base.digest}
    with stage_run(ctx, STAGE, params=config.model_dump(mode="json") | {"seed": seed}, tags=tags) as (client, run_id):
        log_dataset(client, run_id, source.train, context="source/train")
        log_dataset(client, run_id, target.train, context="target/train")
        if target_labelled is not None and target_labelled.validation is not None:
            log_dataset(client, run_id, target_labelled.validation, context="target/validation")
        arguments = dict(
            source=source, target=target.train, target_heldout=target.validation, target_labelled=target_labelled,
            base=base, work_dir=ctx.workdir / "stages", seed=seed, mlflow_run_id=run_id,
            build_run_id=ctx.build_run_id,
        )
        result, prior = run_or_reuse(ctx, STAGE, run_adapt, config, arguments, from_json=AdaptResult.from_dict,
                                     client=client, run_id=run_id, key=tags["adaptflow.cache_key"], inputs=[base])
        if prior is None:
            metrics_logger(client, run_id)(config.max_steps, result.metrics)
        decision = "accepted" if result.accepted else "rejected"
        client.set_tag(run_id, "adaptflow.guard", decision)
        client.set_tag(run_id, "adaptflow.guard.reason", result.reason)
        client.set_tag(ctx.build_run_id, "adaptflow.adapt.guard", decision)
        # The adapted model is logged either way (to inspect a rejection); it is the checkpoint only if accepted.
        record_checkpoint(client, run_id, result.checkpoint, prior=prior, upload=result.adapted.uri)
        client.set_tag(run_id, "adaptflow.adapted.uri", result.adapted.uri)
        return result.checkpoint
