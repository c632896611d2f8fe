"""The recipe schema: every shipped recipe validates; every mistake is reported at once, with its path."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adaptflow.errors import RecipeError
from adaptflow.flows.cli import app
from adaptflow.preflight import preflight_problems
from adaptflow.recipe import load_recipe
from tests.conftest import DATA_ROOT, DOMAINS

SHIPPED = sorted(DOMAINS.glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert {p.stem for p in SHIPPED} >= {"biomedical", "legal", "tiny"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_its_inputs_exist(path):
    recipe = load_recipe(path)
    assert recipe.domain == path.stem
    assert preflight_problems(recipe) == []
    assert recipe.enabled_stages()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


THREE_MISTAKES = """
domain: tiny
model: {name: minilm}
corpora:
  domain: {path: biomedical/unlabelled_ncbi_abstracts/abstracts.txt}
stages:
  pretrain: {lr: -0.001, max_stpes: 10}
evaluation: {corpora: [domain, general]}
"""


def test_all_mistakes_are_reported_with_their_paths(tmp_path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, THREE_MISTAKES))
    problems = caught.value.problems
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "stages.pretrain.lr: Input should be greater than 0 (got -0.001)" in text
    assert "stages.pretrain.max_stpes: unknown key; did you mean 'max_steps'?" in text
    assert "evaluation.corpora[1]: 'general' is not a declared corpus" in text


def test_validate_cli_lists_every_problem_and_build_trains_nothing(tmp_path):
    recipe = write(tmp_path, THREE_MISTAKES.replace("domain: tiny", f"domain: tiny\nworkdir: {tmp_path / 'runs'}"))
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    for where in ("stages.pretrain.lr", "stages.pretrain.max_stpes", "evaluation.corpora[1]"):
        assert where in result.output
    result = runner.invoke(app, ["build", str(recipe)])
    assert result.exit_code == 2
    assert "3 problem(s)" in result.output
    assert not (tmp_path / "runs").exists(), "a rejected recipe must not start a build"


def test_validate_cli_accepts_a_good_recipe():
    result = CliRunner().invoke(app, ["validate", str(DOMAINS / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_overrides_are_parsed_as_yaml_and_applied():
    recipe = load_recipe(
        DOMAINS / "tiny.yaml",
        ["stages.pretrain.lr=5e-5", "stages.pretrain.bf16=true", "evaluation.corpora=[domain]", "seed=7"],
    )
    assert recipe.stages.pretrain.lr == 5e-5
    assert recipe.stages.pretrain.bf16 is True
    assert recipe.evaluation.corpora == ["domain"]
    assert recipe.seed == 7


def test_override_of_a_missing_key_is_an_error_naming_it():
    with pytest.raises(RecipeError) as caught:
        load_recipe(DOMAINS / "tiny.yaml", ["stages.pretrain.learning_rate=1e-4", "nonsense"])
    text = "\n".join(caught.value.problems)
    assert "stages.pretrain.learning_rate: unknown key (from --set)" in text
    assert "--set 'nonsense': expected KEY=VALUE" in text


def test_model_needs_exactly_one_source(tmp_path):
    path = write(tmp_path, "domain: x\nmodel: {name: minilm, path: /tmp}\n")
    with pytest.raises(RecipeError, match="set exactly one of model.name"):
        load_recipe(path)


def test_relative_paths_resolve_against_the_data_root(tmp_path, monkeypatch):
    recipe = load_recipe(DOMAINS / "tiny.yaml")
    assert recipe.corpora["domain"].path == str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt")
    monkeypatch.setenv("ADAPTFLOW_DATA_ROOT", str(tmp_path))
    recipe = load_recipe(DOMAINS / "tiny.yaml")
    assert recipe.corpora["domain"].path.startswith(str(tmp_path))
    assert preflight_problems(recipe)[0].startswith("corpora.domain.path: not found")
    monkeypatch.delenv("ADAPTFLOW_DATA_ROOT")
    monkeypatch.chdir(tmp_path)  # ../shared/data is not beside the cwd: fall back to the recipe's project
    assert load_recipe(DOMAINS / "tiny.yaml").corpora["domain"].path.startswith(str(DATA_ROOT))


def test_caps_shrink_steps_and_datasets():
    recipe = load_recipe(DOMAINS / "biomedical.yaml").capped(max_steps=10, max_examples=50)
    assert recipe.stages.pretrain.max_steps == 10
    assert recipe.stages.pretrain.head_warmup_steps < 10
    assert all(c.max_documents == 50 for c in recipe.corpora.values())
    chain = load_recipe(DOMAINS / "sentiment.yaml").capped(max_steps=10)  # its target MLM warms up for 50 steps
    assert chain.stages.adapt.max_steps == 10 and chain.stages.adapt.target_mlm.head_warmup_steps < 10


def test_recipe_digest_changes_with_content():
    a = load_recipe(DOMAINS / "tiny.yaml")
    b = load_recipe(DOMAINS / "tiny.yaml", ["stages.pretrain.lr=0.1"])
    assert a.digest() == load_recipe(DOMAINS / "tiny.yaml").digest()
    assert a.digest() != b.digest()


@pytest.mark.parametrize("example", ["slurm/build.sbatch", "kubernetes/build-job.yaml"])
def test_the_infra_examples_set_only_recipe_keys_that_exist(example):
    """The job scripts' `--set` overrides (shell variables given sample values) load into a valid recipe."""
    import re

    text = (DOMAINS.parent / "infra" / example).read_text()
    samples = {"WORKDIR": "/shared/runs", "SLURM_NNODES": "2", "GPUS_PER_NODE": "8", "HEAD": "node0"}
    overrides = [re.sub(r"\$(\w+)", lambda m: samples[m.group(1)], value.replace('"', ""))
                 for value in re.findall(r"--set (\S+)", text)]
    assert len(overrides) >= 5
    recipe = load_recipe(DOMAINS / "biomedical.yaml", overrides)
    assert recipe.distributed.launcher == "torchrun" and recipe.distributed.nnodes == 2
    assert Path(DOMAINS.parent / recipe.distributed.deepspeed).is_file()


@pytest.mark.parametrize("overrides,problems", [
    (["stages.active_learning={task: ncbi_disease}"],
     ["stages.active_learning.task: 'ncbi_disease' is a ner task; active_learning works on classification tasks",
      "stages.active_learning.task: 'ncbi_disease' must be the task stages.finetune trains on (chemprot)"]),
    (["stages.active_learning={task: chemprot, budget: 50, initial: 60}"],
     ["budget (50) must be at least initial (60) + rounds (3)"]),
    (["stages.self_instruct={seed_task: chemprot}"],
     ["stages.self_instruct.seed_task: 'chemprot' is a classification task; self_instruct works on sft tasks",
      "needs a decoder (causal LM); this recipe's model is an encoder (minilm)"]),
    (["stages.curate={corpus: pubmed, near_duplicates: {threshold: 1.5}}"],
     ["stages.curate.corpus: 'pubmed' is not a declared corpus",
      "stages.curate.near_duplicates.threshold"]),
], ids=["selection on a ner task", "budget below the cold start", "self-instruct on an encoder",
        "curation of an unknown corpus"])
def test_data_stage_mistakes_are_reported_before_anything_runs(overrides, problems):
    with pytest.raises(RecipeError) as refused:
        load_recipe(DOMAINS / "biomedical.yaml", overrides)
    for problem in problems:
        assert problem in str(refused.value)
