"""The training settings every training stage shares: they mean the same in each stage, map to the loop in one
place, and renamed or unsupported keys are refused with the name to use."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adaptflow.config import Optimization
from adaptflow.errors import RecipeError
from adaptflow.recipe import load_recipe
from adaptflow.stages import adapt, finetune, pretrain
from adaptflow.train import loop_settings
from tests.conftest import DOMAINS

TRAINING_STAGES = {
    "pretrain": pretrain.Config(),
    "finetune": finetune.Config(task="t"),
    "adapt": adapt.Config(source_task="s", target_corpus="c"),
}


@pytest.mark.parametrize("stage", sorted(TRAINING_STAGES))
@pytest.mark.parametrize("eval_every,interval", [(7, 7), ("epoch", 30), (0, 100)])
def test_eval_every_means_the_same_in_every_training_stage(stage, eval_every, interval):
    config = TRAINING_STAGES[stage].model_copy(update={"eval_every": eval_every})
    assert isinstance(config, Optimization)
    settings = loop_settings(config, max_steps=100, steps_per_epoch=30, seed=0, evaluates=True, eval_at_start=True)
    assert settings.eval_every == interval  # the loop also evaluates after the last step
    assert settings.eval_at_start == (eval_every != 0)  # "0: only after the last step" has no "before" point
    assert loop_settings(config, max_steps=100, steps_per_epoch=30, seed=0, evaluates=False).eval_every == 0


def test_the_shared_settings_reach_the_loop_unchanged():
    config = finetune.Config(task="t", lr=1e-3, schedule="cosine", warmup_ratio=0.2, max_grad_norm=0.5,
                             grad_accum_steps=4, bf16=True, log_every=3, eval_every=5)
    settings = loop_settings(config, max_steps=40, steps_per_epoch=10, seed=9, evaluates=True, description="d")
    assert (settings.schedule, settings.warmup_ratio, settings.max_grad_norm, settings.grad_accum_steps,
            settings.bf16, settings.log_every, settings.eval_every, settings.seed) == \
        ("cosine", 0.2, 0.5, 4, True, 3, 5, 9)


def test_the_stage_defaults_stay_their_own():
    assert (pretrain.Config().lr, finetune.Config(task="t").lr, TRAINING_STAGES["adapt"].lr) == (1e-4, 5e-5, 3e-5)
    assert (pretrain.Config().eval_every, finetune.Config(task="t").eval_every) == (50, "epoch")
    assert TRAINING_STAGES["adapt"].schedule == "linear" and TRAINING_STAGES["adapt"].lambda_schedule == "ganin"


@pytest.mark.parametrize("old", ["ganin", "warm_start"])
def test_the_old_lambda_schedule_key_is_refused_with_its_new_name(old):
    with pytest.raises(RecipeError) as refused:
        load_recipe(DOMAINS / "sentiment.yaml", [f"stages.adapt.schedule={old}"])
    assert f"stages.adapt.schedule: {old!r} is a λ schedule; did you mean lambda_schedule: {old}?" in str(refused.value)
    recipe = load_recipe(DOMAINS / "sentiment.yaml", ["stages.adapt.schedule=cosine",
                                                      "stages.adapt.lambda_schedule=warm_start"])
    assert (recipe.stages.adapt.schedule, recipe.stages.adapt.lambda_schedule) == ("cosine", "warm_start")


@pytest.mark.parametrize("stage", ["finetune", "adapt"])
def test_save_every_is_refused_where_a_stage_cannot_resume_from_saves(stage):
    with pytest.raises(ValidationError, match="does not resume from saves yet"):
        type(TRAINING_STAGES[stage]).model_validate(TRAINING_STAGES[stage].model_dump() | {"save_every": 10})
    assert pretrain.Config(save_every=10).save_every == 10


def test_an_old_constant_lambda_schedule_is_not_silently_read_as_a_learning_rate_schedule():
    with pytest.raises(RecipeError, match="Set lambda_schedule too"):  # its adapt section names no λ schedule
        load_recipe(DOMAINS / "biomedical.yaml", ["stages.adapt.schedule=constant"])
    recipe = load_recipe(DOMAINS / "biomedical.yaml", ["stages.adapt.schedule=constant",
                                                       "stages.adapt.lambda_schedule=ganin"])
    assert (recipe.stages.adapt.schedule, recipe.stages.adapt.lambda_schedule) == ("constant", "ganin")
