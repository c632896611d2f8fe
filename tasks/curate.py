"""Corpus curation as a Prefect task: the corpus that pretraining reads is cleaned, deduplicated and
decontaminated against every task split the recipe evaluates; what each filter removed is logged."""

from __future__ import annotations

import dataclasses

from adaptflow.curation import curate_corpus
from adaptflow.labelled import load_records, record_text
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import BuildContext, stage_run, stage_task
from tasks.prepare import PreparedInputs

STAGE = "curate"


@stage_task(STAGE)
def curate(ctx: BuildContext, data: PreparedInputs) -> PreparedInputs:
    """`data` with the curated corpus in place of the raw one (the stages after it read only the curated)."""
    config = ctx.recipe.stages.curate
    corpus = data.corpora[config.corpus]
    eval_sets = {
        f"{name}/{split}": [record_text(record, splits.kind) for record in load_records(ref)]
        for name, splits in data.tasks.items()
        for split, ref in (("validation", splits.validation), ("test", splits.test))
        if ref is not None
    }
    with stage_run(ctx, STAGE, params=config.model_dump(mode="json"),
                   tags={"adaptflow.corpus": config.corpus, "adaptflow.eval_sets": ",".join(eval_sets)}) as (client, run_id):
        for split in ("train", "validation"):
            log_dataset(client, run_id, getattr(corpus, split), context=f"input/{split}")
        curated, result = curate_corpus(corpus, config, eval_sets, out_dir=ctx.workdir / "datasets")
        for split in ("train", "validation"):
            log_dataset(client, run_id, getattr(curated, split), context=f"curated/{split}")
        counts = {k: float(v) for k, v in result.summary().items()}
        counts |= {f"seconds.{step}": t for step, t in result.seconds.items()}
        metrics_logger(client, run_id)(0, counts)
        metrics_logger(client, ctx.build_run_id)(0, {f"curate.{k}": v for k, v in result.summary().items()})
        client.log_dict(run_id, {"removed": result.removed, "contamination": result.contamination,
                                 "eval_texts_skipped": result.eval_texts_skipped, "examples": result.examples},
                        "curation/report.json")
        client.log_text(run_id, "\n".join(result.lines()) + "\n", "curation/summary.txt")
    return dataclasses.replace(data, corpora={**data.corpora, config.corpus: curated})
