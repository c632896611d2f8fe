"""The stage contract: a stage written as one module (here one kept in the tests) registers, runs in this process,
runs on two ranks under the launcher, and runs through the build's generic stage runner — none of which knows it."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from adaptflow import stages
from adaptflow.config import DistributedConfig
from adaptflow.data.corpus import prepare_corpus
from adaptflow.launch import run_stage
from adaptflow.recipe import load_recipe
from adaptflow.stages import StageEnv
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.stage_runs import stage_run
from adaptflow.tracking.runs import ensure_experiment, resolve_tracking, start_run
from tests.conftest import DOMAINS

TWO_RANKS = DistributedConfig(launcher="torchrun", nproc_per_node=2, omp_num_threads=1, timeout_minutes=10)


@pytest.fixture
def throwaway():
    stages.register("throwaway", "tests.stages.throwaway", after="finetune")
    try:
        yield stages.get("throwaway")
    finally:
        stages.unregister("throwaway")


@pytest.fixture
def data(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\nanother document\na third one\n")
    return prepare_corpus(str(corpus), name="corpus", out_dir=tmp_path / "datasets", validation_fraction=0).train


def test_every_registered_stage_keeps_the_contract():
    for name in stages.names():
        module = stages.get(name)
        assert module.NAME == name
        assert isinstance(module.DISTRIBUTED, bool) and isinstance(module.REUSABLE, bool)


def test_a_registered_stage_takes_its_place_in_the_order(throwaway):
    order = stages.names()
    assert order.index("throwaway") == order.index("finetune") + 1
    assert stages.comes_before("finetune", "throwaway") and stages.comes_before("throwaway", "evaluate")


def test_a_module_without_the_contract_is_refused():
    with pytest.raises(TypeError, match="lacks .*Inputs.*Result.*cache_key.*run"):
        stages.register("broken", "tests.conftest")
    assert "broken" not in stages.names()


def test_a_new_stage_runs_in_process_and_on_two_ranks_without_touching_the_launcher(throwaway, data, tmp_path):
    config, inputs = throwaway.Config(value=5), throwaway.Inputs(data=data)
    here = run_stage(throwaway, config, inputs, StageEnv(work_dir=tmp_path / "stages"))
    assert (here.result.total, here.result.world_size, here.world_size, here.result.rows) == (5, 1, 1, data.rows)

    launched = run_stage(throwaway, config, inputs, StageEnv(work_dir=tmp_path / "stages"), distributed=TWO_RANKS,
                         job_dir=tmp_path / "job")
    assert launched.world_size == 2 and launched.result.world_size == 2
    assert launched.result.total == 5 * 1 + 5 * 2  # both ranks added their share
    assert isinstance(launched.result, throwaway.Result)


def test_a_new_stage_runs_through_the_builds_stage_runner(throwaway, data, tmp_path):
    """What the stage's `tasks/` file does: one `stage_run` call gives an MLflow child run with the stage's
    params, cache key, dataset inputs and metrics — here with the stage launched on the recipe's two ranks."""
    recipe = load_recipe(DOMAINS / "tiny.yaml", [f"workdir={tmp_path / 'runs'}", "distributed.launcher=torchrun",
                                                 "distributed.nproc_per_node=2", "distributed.omp_num_threads=1"])
    tracking = resolve_tracking(recipe.tracking, recipe.workdir)
    client = tracking.client()
    experiment = ensure_experiment(client, recipe.experiment_name, tracking.artifact_location)
    build = start_run(client, experiment, "build-tiny", tags={"adaptflow.kind": "build"})
    ctx = BuildContext(recipe, tracking, experiment, build)

    config, inputs = throwaway.Config(value=2), throwaway.Inputs(data=data)
    with stage_run(ctx, throwaway, config, inputs) as run:
        assert run.result.total == 2 * 1 + 2 * 2 and run.prior is None
    logged = MlflowClient(tracking.uri).get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "throwaway"
    assert logged.data.params["value"] == "2" and logged.data.params["seed"] == str(recipe.seed)
    assert logged.data.tags["adaptflow.cache_key"] == throwaway.cache_key(config, inputs, recipe.seed)
    assert logged.data.tags["adaptflow.world_size"] == "2"
    assert logged.data.metrics["total"] == 6.0  # logged by rank 0 of the launched stage
    assert [d.dataset.digest for d in logged.inputs.dataset_inputs] == [data.digest]
