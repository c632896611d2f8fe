"""PEFT methods through the `peft` library (never re-implemented): the recipe's `peft:` mapping is the method's
config as is; the task type comes from the task kind, and newly initialised modules join the saved modules."""

from __future__ import annotations

import logging

from torch import nn

from adaptflow.errors import ConfigError
from adaptflow.models.layers import is_head
from adaptflow.strategies.base import Strategy, StrategySettings, trainable_fraction

log = logging.getLogger(__name__)


def lora(model: nn.Module, settings: StrategySettings) -> Strategy:
    return _peft(model, "lora", settings)


def adalora(model: nn.Module, settings: StrategySettings) -> Strategy:
    # AdaLoRA reallocates ranks on a budget schedule over the whole run, from gradients after each step.
    strategy = _peft(model, "adalora", settings, total_step=settings.total_steps)
    wrapped = strategy.model
    strategy.post_step_hooks.append(lambda step: wrapped.base_model.update_and_allocate(step))
    return strategy


def gralora(model: nn.Module, settings: StrategySettings) -> Strategy:
    return _peft(model, "gralora", settings, target_modules=_attention_projections(model, settings))


def ia3(model: nn.Module, settings: StrategySettings) -> Strategy:
    return _peft(model, "ia3", settings)


def _peft(model: nn.Module, method: str, settings: StrategySettings, **defaults) -> Strategy:
    import peft

    classes = {"lora": peft.LoraConfig, "adalora": peft.AdaLoraConfig, "gralora": peft.GraloraConfig,
               "ia3": peft.IA3Config}
    options = {"task_type": settings.kind.peft_task_type, **defaults, **settings.peft}
    extra = sorted({name.rsplit(".", 1)[0] for name in settings.new_parameters if not is_head(name)})
    if extra and settings.kind.has_head:
        # PEFT adds the task head itself for SEQ_CLS / TOKEN_CLS; newly initialised modules must join it.
        default_heads = ["classifier", "score"]
        options["modules_to_save"] = sorted({*(options.get("modules_to_save") or default_heads), *extra})
    try:
        config = classes[method](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{settings.section}.peft for {method}: {err}") from None
    wrapped = peft.get_peft_model(model, config)
    log.info("%s: %.2f%% of parameters train", method, 100 * trainable_fraction(wrapped))
    return Strategy(wrapped, is_peft=True)


def _attention_projections(model: nn.Module, settings: StrategySettings) -> list[str] | None:
    if "target_modules" in settings.peft:
        return settings.peft["target_modules"]
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for candidates in (["query", "value"], ["q_proj", "v_proj"], ["c_attn"]):
        if set(candidates) <= names:
            return candidates
    raise ConfigError(f"could not guess target_modules for this architecture; set {settings.section}.peft."
                      "target_modules")
