"""Bad inputs, through the command a user runs (`adaptflow build`): each gets a clear message saying what, where
and how to fix it, a non-zero exit, no training started and nothing registered.

Exit 2: found by validation before the build starts (nothing is created). Exit 1: found by the build while
it prepares its inputs or loads the model — still before any training step.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from adaptflow.flows.cli import app
from adaptflow.train.runtime import free_port
from tests.conftest import DOMAINS

pytestmark = pytest.mark.usefixtures("prefect_server")

TRAINING_STAGES = ("pretrain", "adapt", "finetune")


def build(tmp_path: Path, *overrides: str, recipe: Path = DOMAINS / "tiny.yaml", tracking: str | None = None):
    """`adaptflow build` of the (shrunk) tiny recipe with `overrides`; returns (exit code, output)."""
    shrink = [f"workdir={tmp_path / 'runs'}", "corpora.domain.max_documents=60", "corpora.general.max_documents=80",
              "stages.pretrain.max_steps=4", "stages.finetune.max_steps=4", "stages.finetune.seeds=[1]"]
    args = ["build", str(recipe), "--no-progress", "--tracking-uri", tracking or f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for item in [*shrink, *overrides]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    crash = "" if result.exception is None or isinstance(result.exception, SystemExit) else \
        f" Traceback: {result.exception!r}"  # an unhandled error is never an acceptable answer
    # CliRunner swaps sys.stderr per call while Prefect's log handler keeps the first one, so in-process runs
    # print "--- Logging error ---" reports about a closed stream; a user's process never does.
    output = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", result.output, flags=re.S)
    return result.exit_code, " ".join(output.split()) + crash  # one line: rich and typer wrap messages


def assert_refused(tmp_path: Path, code: int, output: str, *, exit_code: int, says: list[str]) -> None:
    assert code == exit_code, output
    for text in says:
        assert text in output, f"{text!r} not in: {output}"
    # No stack of adaptflow's own code (the Prefect test harness may print unrelated tracebacks of its own).
    assert not re.search(r'File "[^"]*/(adaptflow|flows|tasks)/', output) and "adaptflow.errors." not in output
    stages = tmp_path / "runs" / "stages"
    assert not stages.exists() or not any(stages.iterdir()), "a training stage started"
    db = tmp_path / "mlflow.db"
    if exit_code == 2:
        assert not db.exists() and not (tmp_path / "runs").exists(), "validation must not create anything"
    elif db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert not [r for r in runs if r.info.run_name.startswith(TRAINING_STAGES)], "a training stage ran"
        assert {r.info.status for r in runs if r.data.tags.get("adaptflow.kind") == "build"} <= {"FAILED"}
        assert client.search_registered_models() == [], "nothing may be registered"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def chemprot_rows(n: int, label: str = "INHIBITOR") -> str:
    return "".join(json.dumps({"text": f"compound {i} inhibits enzyme {i}", "label": label}) + "\n" for i in range(n))


# ---- the recipe itself: exit 2, nothing created -----------------------------------------------------------------


def test_unknown_recipe_key(tmp_path):
    recipe = write(tmp_path / "r.yaml", (DOMAINS / "tiny.yaml").read_text().replace("    warmup_ratio: 0.1",
                                                                                    "    warmup_ration: 0.1", 1))
    code, out = build(tmp_path, recipe=recipe)
    assert_refused(tmp_path, code, out, exit_code=2,
                   says=["stages.pretrain.warmup_ration: unknown key; did you mean 'warmup_ratio'?"])


def test_wrong_type(tmp_path):
    code, out = build(tmp_path, "stages.pretrain.batch_size=many")
    assert_refused(tmp_path, code, out, exit_code=2, says=["stages.pretrain.batch_size", "valid integer",
                                                          "(got 'many') (from --set)"])


@pytest.mark.parametrize("setting", ["stages.finetune.lr=-0.0001", "stages.pretrain.lr=0"])
def test_negative_or_zero_learning_rate(tmp_path, setting):
    code, out = build(tmp_path, setting)
    assert_refused(tmp_path, code, out, exit_code=2, says=[setting.split("=")[0], "greater than 0"])


def test_zero_steps(tmp_path):
    code, out = build(tmp_path, "stages.pretrain.max_steps=0")
    assert_refused(tmp_path, code, out, exit_code=2, says=["stages.pretrain.max_steps", "greater than 0"])


def test_set_on_a_key_that_does_not_exist(tmp_path):
    code, out = build(tmp_path, "stages.pretrain.learning_rate=0.001")
    assert_refused(tmp_path, code, out, exit_code=2, says=["stages.pretrain.learning_rate", "unknown key"])


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nowhere" / "abstracts.txt"
    code, out = build(tmp_path, f"corpora.domain.path={missing}")
    assert_refused(tmp_path, code, out, exit_code=2, says=[f"corpora.domain.path: not found: {missing}",
                                                          "relative paths resolve against the data root"])


def test_a_deepspeed_config_that_does_not_parse(tmp_path):
    bad = write(tmp_path / "zero.json", '{"zero_optimization": {"stage": 2,}}')
    code, out = build(tmp_path, "distributed.launcher=torchrun", f"distributed.deepspeed={bad}")
    assert_refused(tmp_path, code, out, exit_code=2, says=[f"distributed.deepspeed: {bad} is not JSON"])


def test_base_model_path_that_does_not_exist(tmp_path):
    code, out = build(tmp_path, "model.tiny=null", f"model.path={tmp_path / 'no-model'}")
    assert_refused(tmp_path, code, out, exit_code=2, says=[f"model.path: no such directory: {tmp_path / 'no-model'}"])


def test_base_model_path_without_weights(tmp_path):
    model = tmp_path / "model"
    write(model / "config.json", '{"model_type": "bert"}')
    write(model / "pytorch_model.bin", b"pickled weights are never loaded")
    code, out = build(tmp_path, "model.tiny=null", f"model.path={model}")
    assert_refused(tmp_path, code, out, exit_code=2, says=["holds its weights only as pickle (pytorch_model.bin)",
                                                          "set model.allow_pickle_weights: true"])


def test_a_gate_on_a_stage_that_is_disabled(tmp_path):
    code, out = build(tmp_path, "stages.finetune.enabled=false", "evaluation.gates.min_task_metric=0.5")
    assert_refused(tmp_path, code, out, exit_code=2, says=["evaluation.gates.min_task_metric score the fine-tuned "
                                                          "model, but stages.finetune is disabled"])


def test_tracking_server_that_does_not_answer(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    code, out = build(tmp_path, tracking=uri)
    assert_refused(tmp_path, code, out, exit_code=2, says=[f"tracking URI {uri}: the MLflow server does not answer",
                                                          "--tracking-uri"])


def test_s3_bucket_or_key_that_does_not_exist(tmp_path, s3_env):
    code, out = build(tmp_path, f"corpora.domain.path=s3://{s3_env}/missing/abstracts.txt")
    assert_refused(tmp_path, code, out, exit_code=2, says=["corpora.domain.path: corpus file not found",
                                                          f"s3://{s3_env}/missing/abstracts.txt"])
    code, out = build(tmp_path, "corpora.domain.path=s3://adaptflow-no-such-bucket/abstracts.txt")
    assert_refused(tmp_path, code, out, exit_code=2, says=["bucket 'adaptflow-no-such-bucket' not found"])


def test_unreachable_s3_endpoint(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code, out = build(tmp_path, "corpora.domain.path=s3://bucket/abstracts.txt")
    assert_refused(tmp_path, code, out, exit_code=2, says=["corpora.domain.path", "s3://bucket/abstracts.txt",
                                                          endpoint])


# ---- the data: exit 1 while preparing, before any training step --------------------------------------------------


@pytest.mark.parametrize("name,data,message", [
    ("empty.txt", b"", "contains no non-empty documents"),
    ("blank.txt", b"\n  \n\t\n\n", "contains no non-empty documents"),
    ("latin1.txt", b"fine line\nna\xefve caf\xe9\n", "line 2: not valid UTF-8"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "cut\n', "line 3: malformed JSON"),
    ("fields.jsonl", b'{"body": "a"}\n', "text_field"),
    ("cut.parquet", b"PAR1\x00\x01\x02 not really parquet", "not a readable parquet file"),
], ids=["empty corpus", "only blank lines", "non-UTF-8", "malformed JSONL", "missing text field",
        "truncated parquet"])
def test_a_corpus_that_cannot_be_used(tmp_path, name, data, message):
    path = write(tmp_path / "data" / name, data)
    code, out = build(tmp_path, f"corpora.domain.path={path}")
    assert_refused(tmp_path, code, out, exit_code=1, says=["build failed:", str(path), message])


def test_missing_label_field(tmp_path):
    train = write(tmp_path / "data" / "train.jsonl", "".join(json.dumps({"text": f"t {i}", "relation": "X"}) + "\n"
                                                             for i in range(20)))
    code, out = build(tmp_path, f"tasks.chemprot.train={train}")
    assert_refused(tmp_path, code, out, exit_code=1, says=[f"{train} line 1: no field 'label'",
                                                          "fields present: text, relation", "label_field"])


def test_a_test_label_never_seen_in_training(tmp_path):
    train = write(tmp_path / "data" / "train.jsonl", chemprot_rows(30))
    test = write(tmp_path / "data" / "test.jsonl", chemprot_rows(2) + json.dumps({"text": "x", "label": "ZEBRA"}))
    code, out = build(tmp_path, f"tasks.chemprot.train={train}", f"tasks.chemprot.test={test}",
                      "tasks.chemprot.labels=null", "tasks.chemprot.validation=null")
    assert_refused(tmp_path, code, out, exit_code=1, says=["label 'ZEBRA' in the test split", f"{test} line 3",
                                                          "never occurs in training"])


def test_a_training_set_smaller_than_its_batch_is_refused_before_any_stage_trains(tmp_path):
    code, out = build(tmp_path, "tasks.chemprot.max_examples=12")  # fine-tuning's batch is 16
    assert_refused(tmp_path, code, out, exit_code=1, says=[
        "tasks.chemprot (finetune): 12 training record(s) after splitting, fewer than a batch (16)",
        "lower stages.finetune.batch_size"])


def test_conll_with_a_bad_column_count(tmp_path):
    conll = write(tmp_path / "data" / "train.conll", "Aspirin\tB-Chemical\nhelps\tO\n\nIbuprofen\tNN\tB-Chemical\n")
    recipe = write(tmp_path / "ner.yaml", (DOMAINS / "tiny.yaml").read_text().replace(
        "tasks:\n", f"tasks:\n  chemicals: {{type: ner, format: conll, train: {conll}}}\n", 1))
    code, out = build(tmp_path, "stages.finetune.task=chemicals", recipe=recipe)
    assert_refused(tmp_path, code, out, exit_code=1, says=[f"{conll} line 4: expected 2 columns, found 3"])


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    from transformers import AutoTokenizer

    from adaptflow.models import packaged_model_path

    model = tmp_path / "model"
    model.mkdir()
    source = Path(packaged_model_path("minilm"))
    for f in source.iterdir():
        if f.suffix in (".json", ".safetensors", ".txt") and "tokenizer" not in f.name and f.name != "vocab.txt":
            os.symlink(f, model / f.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens([f"newtoken{i}" for i in range(50)])  # ids beyond the embedding table
    tokenizer.save_pretrained(model)
    code, out = build(tmp_path, "model.tiny=null", f"model.path={model}")
    assert_refused(tmp_path, code, out, exit_code=2, says=[f"model.path: the tokenizer of {model} has 30572 tokens "
                                                          "but the model's embedding has 30522 rows", "don't match"])


def test_non_finite_loss_stops_the_stage_with_its_step_and_registers_nothing(tmp_path):
    code, out = build(tmp_path, "stages.pretrain.lr=1e12", "stages.pretrain.max_grad_norm=null",
                      "stages.pretrain.log_every=1", "stages.pretrain.max_steps=20", "stages.pretrain.warmup_ratio=0")
    assert code == 1 and "build failed: loss became" in out and "between steps" in out, out
    assert "lower the learning rate" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r.info.status for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert runs["pretrain"] == "FAILED" and runs["build-tiny"] == "FAILED" and "finetune-seed1" not in runs
    assert client.search_registered_models() == []
    assert not list((tmp_path / "runs" / "stages").glob("pretrain-*/final"))
