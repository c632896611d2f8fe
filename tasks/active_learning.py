"""Active-learning selection as a Prefect task: from the task's labelled pool, pick the budget of examples the
current model learns most from, in rounds; fine-tuning then trains on the selection."""

from __future__ import annotations

import dataclasses

from adaptflow.active import run_selection, selection_cache_key
from adaptflow.refs import CheckpointRef
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import BuildContext, claimed_work_dir, stage_run, stage_task
from tasks.prepare import PreparedInputs

STAGE = "active_learning"


@stage_task("active-learning")
def select_examples(ctx: BuildContext, model: CheckpointRef, data: PreparedInputs) -> PreparedInputs:
    """`data` whose task trains on the selected examples; the learning curve is the stage run's metrics (step =
    labelled examples), and each example's round, strategy and score are logged as `active_learning/selected.json`."""
    recipe = ctx.recipe
    config, finetune = recipe.stages.active_learning, recipe.stages.finetune
    splits = data.tasks[config.task]
    key = selection_cache_key(config, finetune, model, splits, recipe.seed)
    tags = {"adaptflow.cache_key": key, "adaptflow.input_checkpoint.uri": model.uri,
            "adaptflow.input_checkpoint.digest": model.digest, "adaptflow.task": config.task}
    params = config.model_dump(mode="json") | {"seed": recipe.seed}
    with stage_run(ctx, STAGE, params=params, tags=tags) as (client, run_id):
        log_dataset(client, run_id, splits.train, context="pool")
        with claimed_work_dir(ctx, STAGE, key) as work_dir:
            result = run_selection(config, finetune, task=splits, base=model, work_dir=work_dir / f"{STAGE}-{key}",
                                   seed=recipe.seed, log_metrics=metrics_logger(client, run_id),
                                   trust_remote_code=recipe.model.trust_remote_code)
        log_dataset(client, run_id, result.train, context="selected")
        client.log_dict(run_id, {"strategy": result.strategy, "pool": dataclasses.asdict(result.pool),
                                 "selected": [dataclasses.asdict(s) for s in result.selected]},
                        f"{STAGE}/selected.json")
        client.log_dict(run_id, [{"round": p.round, "labelled": p.labelled, **p.metrics} for p in result.curve],
                        f"{STAGE}/curve.json")
    return dataclasses.replace(data, tasks={**data.tasks, config.task: dataclasses.replace(splits, train=result.train)})
