"""The whole build flow on the tiny recipe: real Prefect (test server), real MLflow (SQLite), real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from adaptflow.data.labelled import read_records
from adaptflow.flows.cli import app
from tests.browser import render_in_chromium
from tests.conftest import DATA_ROOT, DOMAINS

pytestmark = pytest.mark.usefixtures("prefect_server")


def run_build(tmp_path, overrides, *extra):
    summary_path = tmp_path / "summary.json"
    args = ["build", str(DOMAINS / "tiny.yaml"), "--summary-json", str(summary_path), "--no-progress",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    if "stages.finetune.enabled=false" not in overrides:
        assert "task metrics" in result.output and "2 seed(s)" in result.output.replace("\n", " ")
        assert "macro_f1" in result.output and "micro_f1" in result.output
    return json.loads(summary_path.read_text()), MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_tiny_build_end_to_end_is_tracked_with_lineage(tmp_path, tiny_overrides):
    gates = ["evaluation.gates.min_task_metric=0.0", "evaluation.gates.max_robustness_drop=-1",  # can't pass
             "evaluation.gates.max_general_perplexity_rise_pct=1000"]
    summary, client = run_build(tmp_path, tiny_overrides + gates)

    assert summary["domain"] == "tiny" and summary["status"] == "FINISHED"
    assert list(summary["stages"]) == ["prepare", "pretrain", "finetune-seed1", "finetune-seed2", "evaluate"]
    parent = client.get_run(summary["build_run_id"])
    assert parent.data.tags["adaptflow.trigger"] == "manual"
    assert len(parent.data.tags["adaptflow.recipe_digest"]) == 16
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["stages.pretrain.max_steps"] == "16"

    for name, stage in summary["stages"].items():
        child = client.get_run(stage["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == summary["build_run_id"], name
        assert child.info.status == "FINISHED"

    pretrain = client.get_run(summary["stages"]["pretrain"]["run_id"])
    assert pretrain.data.params["lr"] == "0.002" and pretrain.data.params["seed"] == "13"
    inputs = {d.dataset.name: d for d in pretrain.inputs.dataset_inputs}
    assert set(inputs) == {"domain/train", "domain/validation", "general/train"}
    train_input = inputs["domain/train"]
    assert json.loads(train_input.dataset.source)["uri"].endswith("train.parquet")
    assert json.loads(train_input.dataset.profile)["num_rows"] > 0
    assert pretrain.data.tags["adaptflow.input_checkpoint.digest"] == parent.data.tags["adaptflow.base_model.digest"]

    losses = [m.value for m in client.get_metric_history(pretrain.info.run_id, "loss")]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    for metric in ("tokens_per_s", "lr", "grad_norm", "eval_perplexity"):
        assert metric in pretrain.data.metrics

    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"checkpoint", "lineage.json"} <= artifacts
    files = {a.path for a in client.list_artifacts(pretrain.info.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/tokenizer.json"} <= files

    checkpoint = summary["stages"]["pretrain"]["checkpoint_uri"]
    model = AutoModelForMaskedLM.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == 2
    lineage = json.loads((tmp_path / "runs").glob("stages/pretrain-*/final/lineage.json").__next__().read_text())
    assert lineage["mlflow_run_id"] == pretrain.info.run_id
    assert lineage["build_run_id"] == summary["build_run_id"]

    for seed in (1, 2):
        run = client.get_run(summary["stages"][f"finetune-seed{seed}"]["run_id"])
        assert run.data.tags["adaptflow.input_checkpoint.digest"] == pretrain.data.tags["adaptflow.checkpoint.digest"]
        assert {"test_macro_f1", "test_micro_f1", "val_macro_f1", "loss"} <= set(run.data.metrics)
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"chemprot/train", "chemprot/validation",
                                                                       "chemprot/test"}
        reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
        assert reports == {"reports/test_report.json", "reports/confusion_matrix.png"}
        chain = json.loads(open(client.download_artifacts(run.info.run_id, "checkpoint/lineage.json")).read())
        assert [link["stage"] for link in chain["chain"]] == ["base", "pretrain"]
    metrics = summary["metrics"]
    selected = int(metrics["finetune.selected_seed"])
    assert parent.data.tags["adaptflow.finetune.selected_run_id"] == summary["stages"][f"finetune-seed{selected}"]["run_id"]
    assert {"finetune.test_macro_f1_mean", "finetune.test_macro_f1_std", "finetune.test_micro_f1_mean"} <= set(metrics)
    assert metrics["domain_perplexity_after"] < metrics["domain_perplexity_before"]
    assert {"general_perplexity_before", "general_perplexity_after", "general_perplexity_change_pct"} <= set(metrics)

    evaluation = client.get_run(summary["stages"]["evaluate"]["run_id"]).data.metrics
    for seed in (1, 2):  # every seed's checkpoint is evaluated
        for kind in ("typos", "casing", "punctuation", "word_dropout"):
            assert evaluation[f"seed{seed}/robust_{kind}_drop"] == pytest.approx(
                evaluation[f"seed{seed}/robust_clean_macro_f1"] - evaluation[f"seed{seed}/robust_{kind}_macro_f1"])
    assert metrics["eval.test_macro_f1_mean"] == pytest.approx(metrics["finetune.test_macro_f1_mean"])
    assert {"eval.robustness_drop_max_mean", "eval.test_ece_mean", "eval.robust_typos_drop_std"} <= set(metrics)

    # A failed gate is recorded with its numbers; the build itself still finishes.
    evaluate_run = summary["stages"]["evaluate"]["run_id"]
    assert parent.data.tags["adaptflow.gates"] == "failed" == client.get_run(evaluate_run).data.tags["adaptflow.gates"]
    verdicts = json.loads(open(client.download_artifacts(evaluate_run, "gates.json")).read())
    assert [(g["name"], g["passed"]) for g in verdicts["gates"]] == [
        ("min_task_metric", True), ("max_general_perplexity_rise_pct", True), ("max_robustness_drop", False)]
    assert metrics["gate.max_robustness_drop.value"] == metrics["eval.robustness_drop_max_mean"]
    assert metrics["gate.max_robustness_drop.passed"] == 0.0 and metrics["gate.min_task_metric.passed"] == 1.0


def test_a_build_registers_its_model_as_challenger_and_the_version_round_trips(tmp_path, tiny_overrides,
                                                                              monkeypatch):
    import mlflow.pyfunc
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    promoting = ["registry.auto_promote=true", "evaluation.gates.min_task_metric=0.0"]
    summary, client = run_build(tmp_path, tiny_overrides + promoting)
    version = client.get_model_version_by_alias("adaptflow-tiny", "challenger")
    assert int(client.get_model_version_by_alias("adaptflow-tiny", "champion").version) == 1  # gates passed
    assert int(version.version) == 1 and version.run_id == summary["build_run_id"]
    assert client.get_run(summary["build_run_id"]).data.tags["adaptflow.registered_model"] == "adaptflow-tiny/1"
    assert summary["registered_model"] == "adaptflow-tiny/1" and summary["promotion"].startswith("promote")
    selected = int(summary["metrics"]["finetune.selected_seed"])
    chosen = summary["stages"][f"finetune-seed{selected}"]
    tags = version.tags
    assert tags["adaptflow.build_run_id"] == summary["build_run_id"] and tags["adaptflow.gates"] == "passed"
    assert [link.split(":")[0] for link in tags["adaptflow.stage_chain"].split(" → ")] == ["base", "pretrain",
                                                                                          "finetune"]
    assert set(json.loads(tags["adaptflow.datasets"])) == {"chemprot/train", "chemprot/validation", "chemprot/test"}
    assert tags["adaptflow.gate.min_task_metric"].startswith("pass: test macro_f1")

    # The registered version predicts what the build's checkpoint predicts, through pyfunc and plain transformers.
    texts = [r["text"] for r in read_records(DATA_ROOT / "biomedical/chemprot/test.jsonl", fields=["text"],
                                             max_rows=12)]
    checkpoint = AutoModelForSequenceClassification.from_pretrained(chosen["checkpoint_uri"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(chosen["checkpoint_uri"])
    with torch.no_grad():
        ids = checkpoint(**tokenizer(texts, return_tensors="pt", padding=True, truncation=True)).logits.argmax(-1)
    expected = [checkpoint.config.id2label[int(i)] for i in ids]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/adaptflow-tiny@challenger").predict(texts)
    assert list(served["label"]) == expected
    local = Path(client.download_artifacts(summary["build_run_id"], "model", str(tmp_path / "downloaded")))
    plain = AutoModelForSequenceClassification.from_pretrained(local / "model")
    assert plain.config.id2label == checkpoint.config.id2label
    assert (local / "components" / "tokenizer" / "tokenizer.json").is_file()
    assert "torchvision" not in (local / "requirements.txt").read_text()

    # A second build that does not beat the champion on the same test set by δ = 0.01 (it is the same model:
    # every stage is reused) becomes challenger but not champion.
    again, _ = run_build(tmp_path, tiny_overrides + promoting + ["evaluation.gates.min_gain_over_champion=0.01"])
    assert int(client.get_model_version_by_alias("adaptflow-tiny", "challenger").version) == 2
    assert int(client.get_model_version_by_alias("adaptflow-tiny", "champion").version) == 1
    metrics = again["metrics"]
    assert metrics["champion_version"] == 1
    assert metrics["champion_test_macro_f1"] == pytest.approx(summary["metrics"]["eval.test_macro_f1_mean"])
    assert metrics["gate.min_gain_over_champion.value"] == pytest.approx(0.0, abs=1e-9)
    promotion = client.get_run(again["build_run_id"]).data.tags["adaptflow.promotion"]
    assert promotion.startswith("refused:") and "min_gain_over_champion" in promotion

    # Each build logged its HTML report and plots; `adaptflow report` writes one locally, and a browser shows it.
    for build in (summary, again):
        assert build["report"].endswith("/report/report.html")
        logged = {a.path for a in client.list_artifacts(build["build_run_id"], "report/plots")}
        assert {"report/plots/loss-pretrain.png", "report/plots/perplexity.png"} <= logged
    out = tmp_path / "report-out"
    result = CliRunner().invoke(app, ["report", again["build_run_id"], "--out", str(out),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    page = render_in_chromium(out / "report.html", tmp_path)
    assert list(page.sections) == ["summary", "stages", "loss-curves", "evaluation", "gates", "lineage"]
    assert page.body["data-images-decoded"] == page.body["data-images-total"]
    assert {"loss-pretrain", "loss-finetune-seed1", "loss-finetune-seed2", "perplexity"} <= set(page.images)
    assert "adaptflow-tiny version 2 @challenger" in page.sections["summary"] and "refused:" in page.sections["summary"]
    assert "min_gain_over_champion" in page.sections["gates"] and "FAIL" in page.sections["gates"]
    assert f"adaptflow-tiny v2 {tags['adaptflow.checkpoint.digest']} @challenger" in page.sections["lineage"]
    assert "chemprot/test" in page.sections["lineage"] and "finetune-seed" in page.sections["lineage"]
    stage_run = summary["stages"]["pretrain"]["run_id"]
    refused = CliRunner().invoke(app, ["report", stage_run, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert refused.exit_code == 2 and "not an adaptflow build run" in refused.output


def test_build_reads_corpora_from_s3(tmp_path, tiny_overrides, s3_env, s3_client):
    bucket = s3_env
    s3_client.upload_file(str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.jsonl"), bucket,
                          "corpora/abstracts.jsonl")
    overrides = [*tiny_overrides, f"corpora.domain.path=s3://{bucket}/corpora/abstracts.jsonl",
                 "stages.pretrain.max_steps=4", "stages.pretrain.eval_every=0", "evaluation.corpora=[domain]",
                 "stages.finetune.enabled=false"]
    summary, client = run_build(tmp_path, overrides)
    assert summary["status"] == "FINISHED"
    prepare = client.get_run(summary["stages"]["prepare"]["run_id"])
    domain = [d for d in prepare.inputs.dataset_inputs if d.dataset.name == "domain/train"][0]
    assert json.loads(domain.dataset.profile)["prepared_from"] == f"s3://{bucket}/corpora/abstracts.jsonl"


def test_a_failing_stage_fails_the_build_and_registers_its_status(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "stages.pretrain.block_size=4096"]  # longer than the model's positions
    result = CliRunner().invoke(app, ["build", str(DOMAINS / "tiny.yaml"), "--no-progress",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                      *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 1
    assert "block_size (4096) exceeds the model's max_position_embeddings (128)" in result.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("adaptflow-tiny").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["pretrain"] == "FAILED" and status["build-tiny"] == "FAILED"
    build = next(r for r in runs if r.info.run_name == "build-tiny")  # a failed build has its report, too
    assert build.data.tags["adaptflow.report"].endswith("/report/report.html")
    with open(client.download_artifacts(build.info.run_id, "report/report.html", str(tmp_path))) as page:
        assert "FAILED" in page.read()
    assert not list((tmp_path / "runs").glob("stages/pretrain-*/final"))


def sentiment_build(tmp_path, overrides, *, max_examples=120):
    """domains/sentiment.yaml on a tiny model (tokenizer trained on the kitchen text) with a few steps a stage."""
    tiny = [
        f"workdir={tmp_path / 'runs'}", "model.name=null", "model.tiny.tokenizer_corpus=kitchen",
        "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.max_position_embeddings=128",
        "corpora.kitchen.max_documents=300", "corpora.general.max_documents=200",
        "stages.pretrain.max_steps=6", "stages.pretrain.eval_every=3", "stages.pretrain.head_warmup_steps=2",
        "stages.adapt.max_length=64", "stages.adapt.max_steps=8", "stages.adapt.lr=0.01",
        "stages.adapt.max_eval_examples=60", "stages.adapt.target_mlm.head_warmup_steps=2",
        "stages.finetune.max_steps=6", "stages.finetune.eval_every=3", "stages.finetune.max_length=64",
        "stages.finetune.batch_size=4",
        "evaluation.max_blocks=4", "evaluation.pseudo_perplexity_tokens=128", "evaluation.robustness.max_examples=30",
    ]
    args = ["build", str(DOMAINS / "sentiment.yaml"), "--no-progress", "--max-examples", str(max_examples),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--summary-json", str(tmp_path / "s.json")]
    result = CliRunner().invoke(app, args + [a for o in tiny + overrides for a in ("--set", o)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output, json.loads((tmp_path / "s.json").read_text()), MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_the_sentiment_recipe_runs_the_whole_chain_and_registers_the_fine_tuned_classifier(tmp_path):
    """TAPT → adaptation (target MLM + self-training, guarded) → few-shot fine-tuning → evaluation → registry."""
    # A tiny model is never 90 % sure: self-training takes each class's most confident quarter instead.
    output, summary, client = sentiment_build(tmp_path, ["stages.adapt.self_training.threshold=null",
                                                         "stages.adapt.self_training.per_class=0.25"])
    stages = summary["stages"]
    assert set(stages) == {"prepare", "pretrain", "adapt", "finetune-seed13", "evaluate"}
    assert all(stage["status"] == "FINISHED" for stage in stages.values())
    runs = {name: client.get_run(stage["run_id"]) for name, stage in stages.items()}
    # Each stage starts from the checkpoint the one before handed on.
    base = client.get_run(summary["build_run_id"]).data.tags["adaptflow.base_model.digest"]
    assert runs["pretrain"].data.tags["adaptflow.input_checkpoint.digest"] == base
    assert (runs["adapt"].data.tags["adaptflow.input_checkpoint.digest"]
            == runs["pretrain"].data.tags["adaptflow.checkpoint.digest"])
    adapted_out = runs["adapt"].data.tags["adaptflow.checkpoint.digest"]
    assert runs["finetune-seed13"].data.tags["adaptflow.input_checkpoint.digest"] == adapted_out
    assert stages["adapt"]["checkpoint_uri"] == runs["adapt"].data.tags[
        "adaptflow.adapted.uri" if stages["adapt"]["guard"] == "accepted" else "adaptflow.reference.uri"]
    adapt_metrics = runs["adapt"].data.metrics
    assert {"target_test_accuracy", "reference_target_test_accuracy", "pseudo_labelled_fraction",
            "train_target_mlm_loss", "train_pseudo_label_loss"} <= set(adapt_metrics)
    # The registered model is the fine-tuned kitchen classifier, with the whole chain in its provenance.
    version = client.get_model_version_by_alias("adaptflow-sentiment", "challenger")
    chain = [link.split(":")[0] for link in version.tags["adaptflow.stage_chain"].split(" → ")]
    assert chain == ["base", "pretrain", "adapt", "finetune"]
    assert version.tags["adaptflow.checkpoint.digest"] == runs["finetune-seed13"].data.tags["adaptflow.checkpoint.digest"]
    assert "adaptflow.gate.adaptation_beats_source_only" not in version.tags  # evaluation's gates judge this one
    model = AutoModelForSequenceClassification.from_pretrained(stages["finetune-seed13"]["checkpoint_uri"])
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # Each stage says what it added: pretraining in held-out perplexity of its input and output, adaptation
    # against its source-only reference, fine-tuning from the adapted classifier it started with.
    contributions = {name: stage["contribution"] for name, stage in stages.items() if "contribution" in stage}
    assert set(contributions) == {"pretrain", "adapt", "finetune-seed13"}
    pretrained = runs["pretrain"].data.metrics
    assert contributions["pretrain"]["measure"] == "kitchen held-out perplexity"
    assert contributions["pretrain"]["before"] == pretrained["eval_perplexity_start"]  # the tiny base saves its head
    assert contributions["pretrain"]["after"] == pretrained["eval_perplexity"]
    assert contributions["pretrain"]["gain"] == pytest.approx(pretrained["eval_perplexity_start"]
                                                              - pretrained["eval_perplexity"])
    assert contributions["adapt"]["before"] == adapt_metrics["reference_target_test_accuracy"]
    tuned = runs["finetune-seed13"].data.metrics
    assert contributions["finetune-seed13"]["before"] == tuned["input_test_accuracy"]
    assert contributions["finetune-seed13"]["after"] == tuned["test_accuracy"]
    output_accuracy = adapt_metrics["target_test_accuracy" if stages["adapt"]["guard"] == "accepted"
                                     else "reference_target_test_accuracy"]
    assert tuned["input_test_accuracy"] == pytest.approx(output_accuracy, abs=1e-6)  # one test set, one model
    assert "what each stage contributed" in output and "source-only" in output
    assert summary["gates"] in {"passed", "failed"}


@pytest.mark.parametrize("outcome", ["accepted", "rejected"])
def test_an_adapt_only_build_registers_a_text_classifier_whatever_the_guard_decides(tmp_path, monkeypatch, outcome):
    """The adapt stage's output is the build's product: the adapted classifier or the source-only reference, a
    classifier either way, its verdict the guard's gate; `champion` moves only when adaptation won."""
    import mlflow.pyfunc

    from adaptflow.stages import adapt

    only_adapt = ["stages.pretrain.enabled=false", "stages.finetune.enabled=false", "evaluation.enabled=false"]
    if outcome == "accepted":  # nothing target-side: the adapted run is its own reference, so it cannot lose
        only_adapt += ["stages.adapt.adversary=none", "stages.adapt.target_mlm=null", "stages.adapt.self_training=null"]
    else:  # the guard's comparison itself is tested on the stage (tests/stages/test_adapt.py)
        monkeypatch.setattr(adapt, "guard_decision", lambda *a, **k: (False, "forced by the test (source-only won)"))
    output, summary, client = sentiment_build(tmp_path, only_adapt)
    stage = summary["stages"]["adapt"]
    assert stage["guard"] == outcome and "negative-transfer guard on adapt" in output
    run = client.get_run(stage["run_id"])
    handed_on = run.data.tags["adaptflow.adapted.uri" if outcome == "accepted" else "adaptflow.reference.uri"]
    assert stage["checkpoint_uri"] == handed_on
    version = client.get_model_version_by_alias("adaptflow-sentiment", "challenger")
    assert version.tags["adaptflow.checkpoint.digest"] == run.data.tags["adaptflow.checkpoint.digest"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/adaptflow-sentiment@challenger").predict(["Sturdy pan.", "It leaks."])
    assert set(served["label"]) <= {"negative", "positive"}  # served as a text classifier
    gate = version.tags["adaptflow.gate.adaptation_beats_source_only"]
    assert gate.startswith("pass" if outcome == "accepted" else "FAIL")
    assert version.tags["adaptflow.gates"] == ("passed" if outcome == "accepted" else "failed")
    AutoModelForSequenceClassification.from_pretrained(handed_on)  # a classifier, never the input LM
    if outcome == "accepted":
        assert client.get_model_version_by_alias("adaptflow-sentiment", "champion").version == version.version
    else:
        assert summary["promotion"].startswith("refused")
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias("adaptflow-sentiment", "champion")


def test_a_build_launches_its_training_stages_on_two_ranks_under_torchrun(tmp_path, tiny_overrides):
    """`--set distributed.launcher=torchrun --set distributed.nproc_per_node=2`, with DeepSpeed ZeRO-2."""
    distributed = ["distributed.launcher=torchrun", "distributed.nproc_per_node=2",
                   f"distributed.deepspeed={DOMAINS.parent / 'infra/deepspeed/zero2.json'}"]
    summary, client = run_build(tmp_path, tiny_overrides + distributed)
    assert list(summary["stages"]) == ["prepare", "pretrain", "finetune-seed1", "finetune-seed2", "evaluate"]
    for name in ("pretrain", "finetune-seed1", "finetune-seed2"):
        run = client.get_run(summary["stages"][name]["run_id"])
        assert run.data.tags["adaptflow.world_size"] == "2" and run.data.tags["adaptflow.distributed"] == "torchrun"
        assert run.data.tags["adaptflow.deepspeed"].endswith("zero2.json")
        assert (summary["stages"][name]["world_size"], summary["stages"][name]["zero_stage"]) == (2, 2)
        assert len(client.get_metric_history(run.info.run_id, "loss")) > 1  # rank 0 logged while training
        assert (Path(run.data.tags["adaptflow.checkpoint.uri"]) / "model.safetensors").is_file()
    assert "finetune.test_micro_f1_mean" in client.get_run(summary["build_run_id"]).data.metrics


def test_unchanged_stages_are_reused_across_machines_and_rerun_recomputes_from_a_stage(tmp_path, tiny_overrides,
                                                                                      s3_env):
    """Build 1 with MLflow artifacts on S3; build 2 changes only the fine-tuning lr, from another workdir (as on
    another machine): its pretraining is reused, downloaded from S3. Then a rerun from finetune and --no-reuse."""
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    s3 = [f"tracking.artifact_location=s3://{s3_env}/mlartifacts"]
    first, client = run_build(tmp_path, tiny_overrides + s3)
    assert not any("reused_from" in stage for stage in first["stages"].values())
    pretrain = client.get_run(first["stages"]["pretrain"]["run_id"])
    assert pretrain.info.artifact_uri.startswith(f"s3://{s3_env}/")

    shutil.rmtree(tmp_path / "runs" / "stages")  # as on another machine: only MLflow (SQLite + S3) is shared
    elsewhere = [o for o in tiny_overrides if not o.startswith("workdir=")] + [f"workdir={tmp_path / 'other'}"]
    second, _ = run_build(tmp_path, elsewhere + s3 + ["stages.finetune.lr=0.001"])
    assert second["stages"]["pretrain"]["reused_from"] == pretrain.info.run_id
    assert not any("reused_from" in second["stages"][f"finetune-seed{s}"] for s in (1, 2))  # lr changed: recomputed
    local = Path(second["stages"]["pretrain"]["checkpoint_uri"])
    assert local.is_relative_to(tmp_path / "other") and (local / "model.safetensors").is_file()  # from S3
    reused = client.get_run(second["stages"]["pretrain"]["run_id"])
    assert reused.data.tags["adaptflow.checkpoint.digest"] == pretrain.data.tags["adaptflow.checkpoint.digest"]
    assert reused.data.metrics["eval_perplexity"] == pretrain.data.metrics["eval_perplexity"]
    assert second["stages"]["pretrain"]["metrics"] and second["stages"]["finetune-seed1"]["status"] == "FINISHED"

    # A rerun of build 2 from finetune: pretraining reused, fine-tuning recomputed though its key is unchanged.
    result = CliRunner().invoke(app, ["rerun", second["build_run_id"], "--from", "finetune", "--no-progress",
                                      "--summary-json", str(tmp_path / "rerun.json"), *tracking])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rerun = json.loads((tmp_path / "rerun.json").read_text())
    assert rerun["trigger"] == "rerun" and rerun["rerun_of"] == second["build_run_id"]
    assert rerun["stages"]["pretrain"]["reused_from"] == pretrain.info.run_id and "reused" in result.output
    for seed in (1, 2):
        again, before = rerun["stages"][f"finetune-seed{seed}"], second["stages"][f"finetune-seed{seed}"]
        assert "reused_from" not in again
        assert client.get_run(again["run_id"]).data.tags["adaptflow.cache_key"] == \
            client.get_run(before["run_id"]).data.tags["adaptflow.cache_key"]
        assert again["metrics"]["test_macro_f1"] == before["metrics"]["test_macro_f1"]  # deterministic recompute

    status = CliRunner().invoke(app, ["status", "--domain", "tiny", "--json", *tracking])
    assert status.exit_code == 0, status.output
    newest = json.loads(status.output)[0]
    assert newest["build_run_id"] == rerun["build_run_id"] and newest["trigger"] == "rerun"
    assert [s["name"] for s in newest["stages"]] == list(rerun["stages"])
    assert newest["stages"][1]["reused_from"] == pretrain.info.run_id and newest["stages"][1]["status"] == "FINISHED"
    assert CliRunner().invoke(app, ["status", *tracking]).exit_code == 0  # the table

    forced, _ = run_build(tmp_path, tiny_overrides + s3, "--no-reuse")
    assert not any("reused_from" in stage for stage in forced["stages"].values())
    bad = CliRunner().invoke(app, ["rerun", second["build_run_id"], "--from", "adapt", *tracking])
    assert bad.exit_code == 2 and "ran no such stage; choose pretrain | finetune | evaluate" in bad.output
