"""Self-Instruct as a Prefect task (`adaptflow.stages.self_instruct`): the model (after pretraining and
adaptation) grows the seed task's instruction set; fine-tuning then trains on the seeds plus what survived the
filters, each row with its origin."""

from __future__ import annotations

import dataclasses

from adaptflow.refs import CheckpointRef
from adaptflow.stages import self_instruct as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run


@stage_task("self-instruct")
def self_instruct(ctx: BuildContext, model: CheckpointRef, data: PreparedInputs) -> PreparedInputs:
    """`data` whose seed task trains on the seeds plus the generated instructions."""
    recipe = ctx.recipe
    config = recipe.stages.self_instruct
    splits = data.tasks[config.seed_task]
    seed = recipe.seed if config.seed is None else config.seed
    inputs = stage.Inputs(model=model, seeds=splits.train, prompt_template=recipe.stages.finetune.prompt_template,
                          name=f"{config.seed_task}-self-instruct")
    with stage_run(ctx, stage, config, inputs, seed=seed, tags={"adaptflow.task": config.seed_task}) as run:
        result = run.result
        run.log_dataset(result.train, context="train")
        run.log_metrics(0, {"attempts": result.attempts, "kept": result.kept, "seeds": result.seeds,
                            "rounds": result.rounds, "train_rows": result.train.rows,
                            **{f"rejected.{reason}": n for reason, n in result.rejected.items()}})
        run.client.set_tag(run.run_id, "adaptflow.self_instruct.stopped", result.stopped)
        run.client.log_dict(run.run_id, {"rows": list(result.rows)}, "self_instruct/generated.json")
    return dataclasses.replace(data, tasks={**data.tasks, config.seed_task: dataclasses.replace(splits,
                                                                                                train=result.train)})
