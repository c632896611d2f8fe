"""Corpus curation before continued pretraining: the corpus's train and validation splits are cleaned,
deduplicated and decontaminated against every task split the build evaluates (`adaptflow.data.curation`).

    curate.run(Config(...), Inputs(train=..., validation=..., evaluated={"chemprot": TaskSplits}), env) -> Result
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptflow import kinds
from adaptflow.data.corpus import PreparedCorpus
from adaptflow.data.curation import CurateConfig, curate_corpus
from adaptflow.data.labelled import TaskSplits, load_records
from adaptflow.lineage import stage_cache_key
from adaptflow.refs import Record
from adaptflow.stages.contract import StageEnv

NAME = "curate"
DISTRIBUTED = False
REUSABLE = False  # cheap, and its output is content-addressed: a rerun writes nothing new
Config = CurateConfig


@dataclass(frozen=True)
class Inputs(Record):
    corpus: PreparedCorpus = field(metadata={"context": "input"})
    evaluated: dict[str, TaskSplits] = field(default_factory=dict)  # their validation and test splits stay unseen


@dataclass(frozen=True)
class Result(Record):
    """The curated corpus (train and validation) and what each filter did."""

    corpus: PreparedCorpus
    summary: dict[str, int]  # documents in and kept, removed per filter, contaminated per evaluation set
    seconds: dict[str, float]
    report: dict  # removed counts, contamination, evaluation texts too short to check, removed examples
    lines: tuple[str, ...]  # the summary as aligned text lines


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, seed)


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    eval_sets = {
        f"{name}/{split}": [kinds.get(splits.kind).text(record) for record in load_records(ref)]
        for name, splits in inputs.evaluated.items()
        for split, ref in (("validation", splits.validation), ("test", splits.test))
        if ref is not None
    }
    curated, result = curate_corpus(inputs.corpus, config, eval_sets, out_dir=env.datasets_dir)
    report = {"removed": result.removed, "contamination": result.contamination,
              "eval_texts_skipped": result.eval_texts_skipped, "examples": result.examples}
    return Result(corpus=curated, summary=result.summary(), seconds=result.seconds, report=report,
                  lines=tuple(result.lines()))
