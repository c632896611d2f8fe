"""Continued pretraining as a Prefect task: an MLflow child run around `adaptflow.stages.pretrain.run_pretrain`."""

from __future__ import annotations

from adaptflow.refs import CheckpointRef
from adaptflow.stages.pretrain import STAGE, pretrain_cache_key, run_pretrain
from adaptflow.tracking import log_dataset
from tasks import BuildContext, record_checkpoint, run_or_reuse, stage_run, stage_task
from tasks.prepare import PreparedInputs


@stage_task("pretrain")
def pretrain(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> CheckpointRef:
    config = ctx.recipe.stages.pretrain
    corpus = data.corpora[config.corpus]
    replay = data.corpora[config.replay.corpus].train if config.replay else None
    inputs = [d for d in (corpus.train, corpus.validation, replay) if d is not None]
    key = pretrain_cache_key(config, base, inputs, ctx.recipe.seed)
    tags = {
        "adaptflow.cache_key": key,
        "adaptflow.input_checkpoint.uri": base.uri,
        "adaptflow.input_checkpoint.digest": base.digest,
    }
    params = {**config.model_dump(mode="json"), "seed": ctx.recipe.seed}
    with stage_run(ctx, STAGE, params=params, tags=tags) as (client, run_id):
        log_dataset(client, run_id, corpus.train, context="train")
        log_dataset(client, run_id, corpus.validation, context="validation")
        if replay is not None:
            log_dataset(client, run_id, replay, context="replay")
        arguments = dict(
            base=base, train_data=corpus.train, validation_data=corpus.validation if corpus.validation.rows else None,
            replay_data=replay, work_dir=ctx.workdir / "stages", cache_dir=ctx.cache_dir, seed=ctx.recipe.seed,
            mlflow_run_id=run_id, build_run_id=ctx.build_run_id, trust_remote_code=ctx.recipe.model.trust_remote_code,
            checkpoint_mirror=ctx.recipe.checkpoint_mirror,
        )
        checkpoint, prior = run_or_reuse(ctx, STAGE, run_pretrain, config, arguments,
                                         from_json=lambda r: CheckpointRef(**r), client=client, run_id=run_id, key=key,
                                         inputs=[base])
        record_checkpoint(client, run_id, checkpoint, prior=prior)
        client.log_artifact(run_id, f"{checkpoint.uri}/lineage.json")
        return checkpoint
