"""Corpus curation as a Prefect task (`adaptflow.stages.curate`): the corpus that pretraining reads is cleaned,
deduplicated and decontaminated against every task split the recipe evaluates; what each filter removed is
logged."""

from __future__ import annotations

import dataclasses

from adaptflow.stages import curate as stage
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import stage_run


@stage_task(stage.NAME)
def curate(ctx: BuildContext, data: PreparedInputs) -> PreparedInputs:
    """`data` with the curated corpus in place of the raw one (the stages after it read only the curated)."""
    config = ctx.recipe.stages.curate
    inputs = stage.Inputs(corpus=data.corpora[config.corpus], evaluated=data.tasks)
    eval_sets = [f"{name}/{split}" for name, splits in data.tasks.items()
                 for split in ("validation", "test") if getattr(splits, split) is not None]
    tags = {"adaptflow.corpus": config.corpus, "adaptflow.eval_sets": ",".join(eval_sets)}
    with stage_run(ctx, stage, config, inputs, params=config.model_dump(mode="json"), tags=tags) as run:
        result = run.result
        for split in ("train", "validation"):
            run.log_dataset(getattr(result.corpus, split), context=f"curated/{split}")
        run.log_metrics(0, {k: float(v) for k, v in result.summary.items()}
                        | {f"seconds.{step}": t for step, t in result.seconds.items()})
        run.log_metrics(0, {f"curate.{k}": v for k, v in result.summary.items()}, on=ctx.build_run_id)
        run.client.log_dict(run.run_id, result.report, "curation/report.json")
        run.client.log_text(run.run_id, "\n".join(result.lines) + "\n", "curation/summary.txt")
    return dataclasses.replace(data, corpora={**data.corpora, config.corpus: result.corpus})
