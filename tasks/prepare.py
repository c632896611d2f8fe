"""Prepare the build's inputs: every corpus and labelled task the recipe uses (read, dedupe, split,
digest) and the base model."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptflow import stages
from adaptflow.data.corpus import PreparedCorpus, load_texts, prepare_corpus
from adaptflow.data.labelled import TaskSplits, label_counts, load_records, prepare_task
from adaptflow.errors import DataError
from adaptflow.models.builders import materialize_base_model
from adaptflow.models.checkpoints import read_lineage
from adaptflow.refs import CheckpointRef
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import child_run
from adaptflow.tracking.runs import log_dataset, metrics_logger


@dataclass(frozen=True)
class PreparedInputs:
    """References to every prepared corpus and labelled task of a build, by recipe name."""

    corpora: dict[str, PreparedCorpus] = field(default_factory=dict)
    tasks: dict[str, TaskSplits] = field(default_factory=dict)


@stage_task("prepare-data")
def prepare_data(ctx: BuildContext) -> PreparedInputs:
    recipe = ctx.recipe
    names = recipe.used_corpora()
    task_names = recipe.used_tasks()
    params = {"corpora": {name: recipe.corpora[name].model_dump(mode="json") for name in names},
              "tasks": {name: recipe.tasks[name].model_dump(mode="json") for name in task_names},
              "seed": recipe.seed}
    with child_run(ctx, "prepare", params=params) as (client, run_id):
        log = metrics_logger(client, run_id)
        prepared = {}
        for name in names:
            corpus = recipe.corpora[name]
            prepared[name] = p = prepare_corpus(
                corpus.path,
                name=name,
                out_dir=ctx.datasets_dir,
                format=corpus.format,
                text_field=corpus.text_field,
                validation_fraction=corpus.validation_fraction,
                seed=recipe.seed,
                max_documents=corpus.max_documents,
            )
            for split, ref in (("train", p.train), ("validation", p.validation)):
                log_dataset(client, run_id, ref, context=f"{name}/{split}", source_uri=corpus.path)
            log(0, {
                f"{name}.documents_read": p.documents_read,
                f"{name}.duplicates_removed": p.duplicates_removed,
                f"{name}.train_rows": p.train.rows,
                f"{name}.validation_rows": p.validation.rows,
            })
        tasks = {}
        for name in task_names:
            tasks[name] = splits = prepare_task(name, recipe.tasks[name], out_dir=ctx.datasets_dir,
                                                seed=recipe.seed)
            for split in ("train", "validation", "test"):
                ref = getattr(splits, split)
                if ref is not None:
                    log_dataset(client, run_id, ref, context=f"{name}/{split}")
                    log(0, {f"{name}.{split}_rows": ref.rows})
            counts = label_counts(load_records(splits.train), splits.kind)
            log(0, {f"{name}.train_label.{label}": n for label, n in counts.items()})
        problems = [problem for name in recipe.enabled_stages()  # before any stage trains on them
                    if (check := getattr(stages.get(name), "check_data", None)) is not None
                    for problem in check(recipe, prepared, tasks)]
        if problems:
            raise DataError("; ".join(problems))
        return PreparedInputs(corpora=prepared, tasks=tasks)


@stage_task("prepare-model")
def prepare_model(ctx: BuildContext, data: PreparedInputs) -> CheckpointRef:
    """The base model as a checkpoint reference (a tiny model is built, its tokenizer trained, and saved)."""
    model = ctx.recipe.model
    texts = None
    if model.tiny is not None:
        texts = load_texts(data.corpora[model.tiny.tokenizer_corpus].train)
    base = materialize_base_model(model, out_dir=ctx.workdir / "models", tokenizer_texts=texts, seed=ctx.recipe.seed)
    client = ctx.tracking.client()
    client.set_tag(ctx.build_run_id, "adaptflow.base_model.uri", base.uri)
    client.set_tag(ctx.build_run_id, "adaptflow.base_model.digest", base.digest)
    if converted_from := read_lineage(base.uri).get("converted_from"):
        client.set_tag(ctx.build_run_id, "adaptflow.base_model.converted_from_pickle", converted_from)
    return base
