"""Adversarial domain adaptation as a Prefect task (`adaptflow.stages.adapt`), with the negative-transfer
guard's decision recorded as tags and metrics."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages import adapt as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run


@stage_task("adapt")
def adapt(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> CheckpointRef:
    """Run DANN; return the adapted checkpoint, or `base` itself when the guard rejects the stage."""
    config = ctx.recipe.stages.adapt
    target = data.corpora[config.target_corpus]
    inputs = stage.Inputs(base=base, source=data.tasks[config.source_task], target=target.train,
                          target_heldout=target.validation,
                          target_labelled=data.tasks[config.target_task] if config.target_task else None)
    with stage_run(ctx, stage, config, inputs) as run:
        result = run.result
        if run.prior is None:
            run.log_metrics(config.max_steps, result.metrics)
        decision = "accepted" if result.accepted else "rejected"
        run.client.set_tag(run.run_id, "adaptflow.guard", decision)
        run.client.set_tag(run.run_id, "adaptflow.guard.reason", result.reason)
        run.client.set_tag(ctx.build_run_id, "adaptflow.adapt.guard", decision)
        # The adapted model is logged either way (to inspect a rejection); it is the checkpoint only if accepted.
        run.record_checkpoint(result.checkpoint, upload=result.adapted.uri)
        run.client.set_tag(run.run_id, "adaptflow.adapted.uri", result.adapted.uri)
        return result.checkpoint
