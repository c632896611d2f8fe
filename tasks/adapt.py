"""Domain adaptation as a Prefect task (`adaptflow.stages.adapt`), with the negative-transfer guard's decision —
which classifier went on, and both scores — recorded as tags and metrics."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages import adapt as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run


@stage_task("adapt")
def adapt(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> stage.Result:
    """Adapt; the result's `checkpoint` is the adapted classifier, or the source-only reference when the guard
    rejects the adaptation."""
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
        for target_run in (run.run_id, ctx.build_run_id):
            run.client.set_tag(target_run, "adaptflow.adapt.guard", decision)
            run.client.set_tag(target_run, "adaptflow.adapt.output", result.output)
        run.client.set_tag(run.run_id, "adaptflow.guard", decision)
        run.client.set_tag(run.run_id, "adaptflow.guard.reason", result.reason)
        run.client.set_tag(run.run_id, "adaptflow.adapted.uri", result.adapted.uri)
        if result.reference is not None:
            run.client.set_tag(run.run_id, "adaptflow.reference.uri", result.reference.uri)
        run.record_checkpoint(result.checkpoint)
        return result
