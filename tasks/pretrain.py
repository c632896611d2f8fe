"""Continued pretraining as a Prefect task (`adaptflow.stages.pretrain`)."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages import pretrain as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run


@stage_task("pretrain")
def pretrain(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> CheckpointRef:
    config = ctx.recipe.stages.pretrain
    corpus = data.corpora[config.corpus]
    replay = data.corpora[config.replay.corpus].train if config.replay else None
    inputs = stage.Inputs(base=base, train=corpus.train, validation=corpus.validation, replay=replay)
    with stage_run(ctx, stage, config, inputs) as run:
        checkpoint = run.result.checkpoint
        if run.prior is None:  # the held-out numbers of input and output, beside the curve
            run.log_metrics(config.max_steps, run.result.metrics)
        run.record_checkpoint(checkpoint)
        run.client.log_artifact(run.run_id, f"{checkpoint.uri}/lineage.json")
        return checkpoint
