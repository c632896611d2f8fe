"""Fine-tuning strategies: which weights train, and on which schedule. One registry, `STRATEGIES`.

    full                 every weight trains
    lora, adalora,       PEFT methods (`peft_methods`: the recipe's `peft:` mapping is passed to the PEFT config
    gralora, ia3         as is: r, lora_alpha, lora_dropout, target_modules, ...); the task head trains fully
    adapters             bottleneck adapters after each layer's attention and feed-forward outputs (`adapters`;
                         the `adapters` library pins transformers 4.x, so this is a small module of our own)
    feature_extraction   the encoder is frozen; only the head trains (`freezing`)
    gradual_unfreezing   ULMFiT: the head first, then one more layer group from the top every N steps (`freezing`)

Adding a strategy: a function `(model, StrategySettings) -> Strategy` in the module of its family (or a new
one), and its name in `STRATEGIES`. Recipes name it in `stages.finetune.strategy`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adaptflow.errors import ConfigError
from adaptflow.strategies import adapters, freezing, peft_methods
from adaptflow.strategies.base import Strategy, StrategySettings, trainable_fraction

STRATEGIES: dict[str, Callable[[nn.Module, StrategySettings], Strategy]] = {
    "full": lambda model, settings: Strategy(model),
    "lora": peft_methods.lora,
    "adalora": peft_methods.adalora,
    "gralora": peft_methods.gralora,
    "ia3": peft_methods.ia3,
    "adapters": adapters.bottleneck_adapters,
    "feature_extraction": freezing.feature_extraction,
    "gradual_unfreezing": freezing.gradual_unfreezing,
}


def apply_strategy(model: nn.Module, strategy: str, settings: StrategySettings, *, seed: int = 0) -> Strategy:
    """Prepare `model` for `strategy`; weights it adds (LoRA, adapters) start from `seed`, whatever this
    process drew from its random generator before."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown fine-tuning strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return STRATEGIES[strategy](model, settings)


__all__ = ["STRATEGIES", "Strategy", "StrategySettings", "apply_strategy", "trainable_fraction"]
