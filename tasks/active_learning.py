"""Active-learning selection as a Prefect task (`adaptflow.stages.active_learning`): from the task's labelled
pool, pick the budget of examples the current model learns most from, in rounds; fine-tuning then trains on the
selection."""

from __future__ import annotations

import dataclasses

from adaptflow.refs import CheckpointRef
from adaptflow.stages import active_learning as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run


@stage_task("active-learning")
def select_examples(ctx: BuildContext, model: CheckpointRef, data: PreparedInputs) -> PreparedInputs:
    """`data` whose task trains on the selected examples; the learning curve is the stage run's metrics (step =
    labelled examples), and each example's round, strategy and score are logged as `active_learning/selected.json`."""
    config = ctx.recipe.stages.active_learning
    splits = data.tasks[config.task]
    inputs = stage.Inputs(base=model, task=splits, finetune=ctx.recipe.stages.finetune)
    with stage_run(ctx, stage, config, inputs, tags={"adaptflow.task": config.task}) as run:
        result = run.result
        run.log_dataset(result.train, context="selected")
        run.client.log_dict(run.run_id, {"strategy": result.strategy, "pool": result.pool.to_dict(),
                                         "selected": [s.to_dict() for s in result.selected]},
                            f"{stage.NAME}/selected.json")
        run.client.log_dict(run.run_id, [{"round": p.round, "labelled": p.labelled, **p.metrics}
                                         for p in result.curve], f"{stage.NAME}/curve.json")
    return dataclasses.replace(data, tasks={**data.tasks, config.task: dataclasses.replace(splits,
                                                                                           train=result.train)})
