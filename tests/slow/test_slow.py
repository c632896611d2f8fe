"""Slow tier: the real pretrained MiniLM on the real biomedical corpus, through the shipped recipe."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForMaskedLM
from typer.testing import CliRunner

from adaptflow.flows.cli import app
from tests.conftest import DOMAINS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_minilm_biomedical_pretraining_lowers_domain_perplexity(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = CliRunner().invoke(app, [
        "build", str(DOMAINS / "biomedical.yaml"), "--no-progress", "--max-steps", "40",
        "--set", f"workdir={tmp_path / 'runs'}", "--set", "stages.pretrain.eval_every=0",
        "--set", "stages.pretrain.save_every=0", "--summary-json", str(summary_path),
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads(summary_path.read_text())
    metrics = summary["metrics"]
    assert metrics["domain_perplexity_after"] < metrics["domain_perplexity_before"]
    assert metrics["general_perplexity_after"] > 0
    pretrain = summary["stages"]["pretrain"]
    assert pretrain["metrics"]["loss"] < 10  # the untrained head starts near ln(30522) ≈ 10.3
    model = AutoModelForMaskedLM.from_pretrained(pretrain["checkpoint_uri"])
    assert model.config.hidden_size == 384


def test_minilm_chemprot_fine_tuning_beats_the_majority_class(tmp_path):
    from sklearn.metrics import f1_score

    from adaptflow.data.labelled import load_records, prepare_task
    from adaptflow.recipe import load_recipe

    summary_path = tmp_path / "summary.json"
    result = CliRunner().invoke(app, [
        "build", str(DOMAINS / "biomedical.yaml"), "--no-progress", "--max-examples", "800",
        "--set", f"workdir={tmp_path / 'runs'}", "--set", "stages.pretrain.enabled=false",
        "--set", "stages.finetune.max_steps=150", "--set", "stages.finetune.eval_every=0",
        "--set", "evaluation.enabled=false", "--summary-json", str(summary_path),
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads(summary_path.read_text())["metrics"]

    # The majority-class baseline on the same (capped) test split, scored by the same library.
    recipe = load_recipe(DOMAINS / "biomedical.yaml").capped(max_examples=800)
    splits = prepare_task("chemprot", recipe.tasks["chemprot"], out_dir=tmp_path / "baseline")
    train = [r["label"] for r in load_records(splits.train)]
    test = [r["label"] for r in load_records(splits.test)]
    majority = max(set(train), key=train.count)
    baseline = f1_score(test, [majority] * len(test), labels=list(splits.labels), average="macro", zero_division=0)
    assert metrics["finetune.test_macro_f1_mean"] > baseline + 0.02, (metrics, baseline)
    assert metrics["finetune.test_accuracy_mean"] > test.count(majority) / len(test), metrics
