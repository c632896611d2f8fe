"""The data stages inside a real build (Prefect test server, MLflow on SQLite): curation before pretraining,
Self-Instruct generation and active-learning selection before fine-tuning. Each is a recipe key, runs as its own
task with a child run, and hands the next stage a dataset whose digest the lineage shows."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from adaptflow.data.corpus import read_texts
from adaptflow.data.labelled import read_records
from adaptflow.flows.cli import app
from tests.conftest import DATA_ROOT, DOMAINS
from tests.data.test_selfinstruct import SEEDS, teach_tiny_gpt2

pytestmark = pytest.mark.usefixtures("prefect_server")

NO_EVAL = ["evaluation.enabled=false", "registry.enabled=false", "stages.finetune.seeds=[1]"]


def run_build(tmp_path, overrides, *extra) -> tuple[dict, MlflowClient]:
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["build", str(DOMAINS / "tiny.yaml"), "--summary-json", str(tmp_path / "summary.json"), "--no-progress",
            "--tracking-uri", db, *extra, *[a for o in overrides for a in ("--set", o)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((tmp_path / "summary.json").read_text()) | {"output": result.output}, MlflowClient(db)


def stage(client, summary, name):
    return client.get_run(summary["stages"][name]["run_id"])


def inputs(run) -> dict[str, str]:
    """A run's dataset inputs: context → digest."""
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset.digest
            for d in run.inputs.dataset_inputs}


def test_curation_cleans_the_corpus_pretraining_reads(tmp_path, tiny_overrides):
    # A corpus with planted faults: a near-duplicate (two words changed), an abstract wrapped in markup (a copy
    # once stripped), a too-short line, and a ChemProt test sentence pasted into a document (the leak).
    abstracts = read_texts(str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"), max_rows=60)
    leaked = read_records(str(DATA_ROOT / "biomedical/chemprot/test.jsonl"), fields=["text"])[0]["text"]
    near = abstracts[3].split()
    near[5], near[-3] = "changed", "words"
    planted = [*abstracts, " ".join(near), f"<p>{abstracts[7]}</p>", "too short",
               f"Background of a new report: {leaked}"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(planted) + "\n")
    summary, client = run_build(tmp_path, [
        *tiny_overrides, f"corpora.domain.path={corpus}", "corpora.domain.max_documents=null",
        "stages.curate={corpus: domain, min_words: 5}", *NO_EVAL], "--max-steps", "8")
    metrics = summary["metrics"]
    removed = {k.removeprefix("curate.removed."): v for k, v in metrics.items() if k.startswith("curate.removed.")}
    assert {k: v for k, v in removed.items() if v} == {"markup_stripped": 1, "too_short": 1, "exact_duplicate": 1,
                                                       "near_duplicate": 1, "contaminated": 1}
    assert metrics["curate.contaminated_by.chemprot/test"] == 1
    assert (metrics["curate.documents_in"], metrics["curate.documents_kept"]) == (len(planted), len(planted) - 4)
    assert "corpus curation" in summary["output"] and "overlapping chemprot/test" in summary["output"]

    curate, pretrain = stage(client, summary, "curate"), stage(client, summary, "pretrain")
    curated = inputs(curate)
    assert curated["curated/train"] != curated["input/train"]
    assert inputs(pretrain)["train"] == curated["curated/train"], "pretraining read the curated corpus"
    report = json.loads(open(client.download_artifacts(curate.info.run_id, "curation/report.json",
                                                       str(tmp_path))).read())
    assert report["contamination"] == {"chemprot/validation": 0, "chemprot/test": 1}
    assert leaked[:40] in report["examples"]["contaminated"][0]


def test_active_learning_selects_the_training_split_finetuning_reads(tmp_path, tiny_overrides):
    summary, client = run_build(tmp_path, [
        *tiny_overrides, "stages.pretrain.enabled=false",
        "stages.active_learning={task: chemprot, strategy: entropy, budget: 60, initial: 30, rounds: 2}",
        "stages.finetune.max_steps=6", "stages.finetune.eval_every=0", *NO_EVAL])
    selection = stage(client, summary, "active_learning")
    curve = [m.step for m in client.get_metric_history(selection.info.run_id, "labelled")]
    assert curve == [30, 45, 60], "one learning-curve point per round, at the labelled size"
    assert "test_macro_f1" in selection.data.metrics
    selected = inputs(selection)["selected"]
    assert inputs(stage(client, summary, "finetune-seed1"))["train"] == selected
    local = client.download_artifacts(selection.info.run_id, "active_learning/selected.json", str(tmp_path))
    chosen = json.loads(open(local).read())["selected"]
    assert len(chosen) == 60 and len({c["index"] for c in chosen}) == 60
    assert {c["round"] for c in chosen} == {0, 1, 2}
    assert all(c["score"] is not None for c in chosen if c["round"] > 0), "uncertainty picks carry their score"


def test_self_instruct_grows_the_sft_task_a_decoder_is_fine_tuned_on(tmp_path, tiny_overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = teach_tiny_gpt2()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(tmp_path / "decoder")
    tokenizer.save_pretrained(tmp_path / "decoder")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    summary, client = run_build(tmp_path, [
        *tiny_overrides, "model.tiny=null", f"model.path={tmp_path / 'decoder'}", "stages.pretrain.enabled=false",
        f"tasks.instructions={{type: sft, train: {seeds}, validation_fraction: 0}}",
        "stages.self_instruct={seed_task: instructions, target_size: 4, max_attempts: 320, batch_size: 16, "
        "max_new_tokens: 40, response_max_new_tokens: 40, temperature: 1.0, top_p: 0.95, response_examples: 1}",
        "stages.finetune.task=instructions", "stages.finetune.max_steps=4", "stages.finetune.batch_size=4",
        "stages.finetune.eval_every=0",
        *NO_EVAL])
    generation = stage(client, summary, "self_instruct")
    kept = generation.data.metrics["kept"]
    assert 1 <= kept <= 4 and generation.data.metrics["train_rows"] == len(SEEDS) + kept
    rejected = sum(v for k, v in generation.data.metrics.items() if k.startswith("rejected."))
    assert generation.data.metrics["attempts"] == kept + rejected
    train = inputs(generation)["train"]
    assert inputs(stage(client, summary, "finetune-seed1"))["train"] == train, "SFT trained on the grown set"
    local = client.download_artifacts(generation.info.run_id, "self_instruct/generated.json", str(tmp_path))
    rows = json.loads(open(local).read())["rows"]
    assert len(rows) == kept and all(r["generator"] and r["shown_ids"] and r["id"].startswith("gen-") for r in rows)
