"""Self-Instruct as a Prefect task: the model (after pretraining and adaptation) grows the seed task's
instruction set; fine-tuning then trains on the seeds plus what survived the filters, each row with its origin."""

from __future__ import annotations

import dataclasses

from adaptflow.labelled import load_records
from adaptflow.models import load_model
from adaptflow.refs import CheckpointRef
from adaptflow.selfinstruct import generate_instructions, write_instructions
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import BuildContext, stage_run, stage_task
from tasks.prepare import PreparedInputs

STAGE = "self_instruct"


@stage_task("self-instruct")
def self_instruct(ctx: BuildContext, model: CheckpointRef, data: PreparedInputs) -> PreparedInputs:
    """`data` whose seed task trains on the seeds plus the generated instructions."""
    recipe = ctx.recipe
    config = recipe.stages.self_instruct
    splits = data.tasks[config.seed_task]
    seed = recipe.seed if config.seed is None else config.seed
    tags = {"adaptflow.input_checkpoint.uri": model.uri, "adaptflow.input_checkpoint.digest": model.digest,
            "adaptflow.task": config.seed_task}
    with stage_run(ctx, STAGE, params=config.model_dump(mode="json") | {"seed": seed}, tags=tags) as (client, run_id):
        log_dataset(client, run_id, splits.train, context="seeds")
        seeds = load_records(splits.train)
        generator, tokenizer = load_model(model, "clm", seed=seed, trust_remote_code=recipe.model.trust_remote_code)
        result = generate_instructions(generator, tokenizer, seeds, config, template=recipe.stages.finetune.prompt_template,
                                       seed=seed, model_digest=model.digest)
        train = write_instructions(result, name=f"{config.seed_task}-self-instruct", out_dir=ctx.workdir / "datasets",
                                   seeds=seeds)
        log_dataset(client, run_id, train, context="train")
        metrics_logger(client, run_id)(0, {"attempts": result.attempts, "kept": len(result.rows), "seeds": len(seeds),
                                           "rounds": result.rounds, "train_rows": train.rows,
                                           **{f"rejected.{reason}": n for reason, n in result.rejected.items()}})
        client.set_tag(run_id, "adaptflow.self_instruct.stopped", result.stopped)
        client.log_dict(run_id, {"rows": list(result.rows)}, "self_instruct/generated.json")
    return dataclasses.replace(data, tasks={**data.tasks, config.seed_task: dataclasses.replace(splits, train=train)})
