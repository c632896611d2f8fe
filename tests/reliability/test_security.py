"""Security promises: no secret reaches MLflow, the workdir or the logs; names from a recipe cannot climb out of
their directories; remote code runs only when the recipe says so, and then loudly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from adaptflow import storage
from adaptflow.errors import DataError, RecipeError
from adaptflow.flows.cli import app
from adaptflow.models import load_model, materialize_base_model, pickle_refusal
from adaptflow.preflight import preflight_problems
from adaptflow.recipe import load_recipe
from tests.conftest import DOMAINS

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYADAPTFLOW7",
    "AWS_SECRET_ACCESS_KEY": "fakeAwsSecretKeyAdaptflow0123456789abcd",
    "AWS_SESSION_TOKEN": "FakeSessionTokenAdaptflow55",
    "HF_TOKEN": "hf_FakeHuggingFaceTokenAdaptflow",
    "MLFLOW_TRACKING_PASSWORD": "FakeMlflowPasswordAdaptflow",
    "PREFECT_API_KEY": "pnu_FakePrefectKeyAdaptflow",
}
URI_PASSWORD = "FakeUriPasswordAdaptflow"
QUERY_TOKEN = "FakeQueryTokenAdaptflow"


@pytest.mark.usefixtures("prefect_server")
def test_planted_secrets_never_reach_mlflow_the_workdir_or_the_logs(tmp_path, tiny_overrides, monkeypatch, capfd,
                                                                    caplog):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    overrides = [*tiny_overrides, "stages.finetune.seeds=[1]", "registry.auto_promote=true",
                 # credentials inside recipe values: a tracking URI with a password, a mirror URL with a token
                 f"tracking.uri=http://alice:{URI_PASSWORD}@mlflow.invalid:5000",
                 f"checkpoint_mirror={tmp_path / 'mirror'}?token={QUERY_TOKEN}"]
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(app, ["build", str(DOMAINS / "tiny.yaml"), "--no-progress", "--tracking-uri", db,
                                          *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    planted = [*SECRETS.values(), URI_PASSWORD, QUERY_TOKEN]

    client = MlflowClient(db)
    texts: list[tuple[str, str]] = [("cli output", result.output), ("captured output", "".join(capfd.readouterr())),
                                    ("log records", "\n".join(r.getMessage() for r in caplog.records))]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 5
    for run in runs:
        texts.append((f"run {run.info.run_name}", repr(run.data.params) + repr(run.data.tags)
                      + repr(sorted(run.data.metrics)) + repr([d.dataset.source + d.dataset.profile
                                                               for d in run.inputs.dataset_inputs])))
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts" / run.info.run_id)))
        texts += [(str(f), f.read_bytes().decode("utf-8", "replace")) for f in local.rglob("*") if f.is_file()]
    for version in client.search_model_versions("name='adaptflow-tiny'"):
        texts.append((f"model version {version.version}", repr(version.tags) + version.source))
    texts += [(str(f), f.read_bytes().decode("utf-8", "replace")) for f in (tmp_path / "runs").rglob("*")
              if f.is_file() and f.suffix != ".safetensors"]
    for where, text in texts:
        for secret in planted:
            assert secret not in text, f"{secret} leaked into {where}"
    build = next(r for r in runs if r.data.tags.get("adaptflow.kind") == "build")
    assert build.data.params["tracking.uri"] == "http://***@mlflow.invalid:5000"  # logged, redacted
    assert build.data.params["checkpoint_mirror"].endswith("?token=***")


@pytest.mark.parametrize("section", ["corpora", "tasks"])
@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "x" * 65])
def test_corpus_and_task_names_cannot_become_paths(tmp_path, section, name):
    entry = "{path: x.txt}" if section == "corpora" else "{type: classification, train: x.jsonl}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text((DOMAINS / "tiny.yaml").read_text().replace(f"\n{section}:\n", f"\n{section}:\n  '{name}': {entry}\n", 1))
    with pytest.raises(RecipeError, match=rf"{section}: name .* must start with a letter or digit and hold only"):
        load_recipe(recipe)


def test_paths_built_from_names_stay_under_their_base(tmp_path):
    assert storage.join("s3://bucket/runs", "pretrain-abc", "final") == "s3://bucket/runs/pretrain-abc/final"
    assert storage.join(tmp_path, "datasets", "domain-1f2e") == str(tmp_path / "datasets" / "domain-1f2e")
    for part in ("../outside", "a/../../b", "/etc/passwd", "s3://other-bucket/key"):
        with pytest.raises(ValueError, match="would leave"):
            storage.join(tmp_path, part)
        with pytest.raises(ValueError, match="would leave"):
            storage.join("s3://bucket/runs", part)


def test_remote_code_is_off_by_default_and_loud_when_on(tmp_path, tiny_overrides, caplog):
    assert load_recipe(DOMAINS / "biomedical.yaml").model.trust_remote_code is False
    from adaptflow.tasks.build_run import build_run

    recipe = load_recipe(DOMAINS / "tiny.yaml", [*tiny_overrides, "model.trust_remote_code=true"])
    with caplog.at_level(logging.WARNING, logger="adaptflow.build"):
        with build_run(recipe, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", trigger="manual") as ctx:
            run_id = ctx.build_run_id
    assert any("trust_remote_code is on" in r.getMessage() and "repositories you trust" in r.getMessage()
               for r in caplog.records)
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.tags[
        "adaptflow.trust_remote_code"] == "true"


def test_pickle_weights_are_refused_unless_the_recipe_allows_them_and_then_converted_once(tmp_path, tiny_bert,
                                                                                         caplog):
    """A checkpoint with only `pytorch_model.bin` is refused (preflight and loader); with
    `model.allow_pickle_weights` it is read tensors-only, converted to safetensors once, and logged loudly."""
    model, tokenizer = tiny_bert
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # how older checkpoints were written

    refused = load_recipe(DOMAINS / "tiny.yaml", ["model.tiny=null", f"model.path={pickled}"])
    assert preflight_problems(refused, f"sqlite:///{tmp_path / 'mlflow.db'}") == [
        f"model.path: {pickle_refusal(pickled)}"]
    with pytest.raises(DataError, match=r"holds its weights only as pickle \(pytorch_model.bin\).*"
                                        r"model.allow_pickle_weights: true"):
        materialize_base_model(refused.model, out_dir=tmp_path / "models", tokenizer_texts=None, seed=0)
    assert not (tmp_path / "models").exists()

    allowed = load_recipe(DOMAINS / "tiny.yaml", ["model.tiny=null", f"model.path={pickled}",
                                                  "model.allow_pickle_weights=true"])
    assert preflight_problems(allowed, f"sqlite:///{tmp_path / 'mlflow.db'}") == []
    with caplog.at_level(logging.WARNING, logger="adaptflow.models"):
        ref = materialize_base_model(allowed.model, out_dir=tmp_path / "models", tokenizer_texts=None, seed=0)
    assert "model.allow_pickle_weights is on" in caplog.text and "only do this for a checkpoint you trust" in \
        caplog.text.lower()
    converted = Path(ref.uri)
    assert sorted(p.name for p in converted.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(converted.glob("*.bin"))
    loaded, _ = load_model(ref, "mlm")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)

    caplog.clear()
    again = materialize_base_model(allowed.model, out_dir=tmp_path / "models", tokenizer_texts=None, seed=0)
    assert again == ref and "allow_pickle_weights" not in caplog.text, "converted once, then reused"
