"""Slow tier: the real pretrained MiniLM on the real biomedical corpus, through the shipped recipe."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForMaskedLM
from typer.testing import CliRunner

from flows.cli import app
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
