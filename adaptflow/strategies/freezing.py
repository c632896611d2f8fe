"""Strategies that choose which existing weights train: feature extraction (only the head) and gradual unfreezing
(ULMFiT: the head first, then one more layer group from the top every `unfreeze_every` steps)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from adaptflow.models.layers import layer_groups
from adaptflow.strategies.base import Strategy, StrategySettings, freeze_all_but

log = logging.getLogger(__name__)


def feature_extraction(model: nn.Module, settings: StrategySettings) -> Strategy:
    freeze_all_but(model, settings.is_new)
    return Strategy(model)


def gradual_unfreezing(model: nn.Module, settings: StrategySettings) -> Strategy:
    return Strategy(model, step_hooks=[unfreezing_schedule(model, every=settings.unfreeze_every)])


def unfreezing_schedule(model: nn.Module, *, every: int) -> Callable[[int], None]:
    """A step hook: at step s, the head and the top 1 + s // every layer groups train; the rest is frozen."""
    groups = layer_groups(model)
    state = {"open": -1}

    def hook(step: int) -> None:
        open_groups = min(len(groups), 1 + step // every)
        if open_groups == state["open"]:
            return
        state["open"] = open_groups
        for level, params in enumerate(groups):
            trainable = level >= len(groups) - open_groups
            for p in params:
                p.requires_grad_(trainable)
        log.info("gradual unfreezing: step %d, top %d of %d layer groups train", step, open_groups, len(groups))

    hook(0)
    return hook
