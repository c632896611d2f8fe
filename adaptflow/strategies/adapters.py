"""Bottleneck adapters (Houlsby et al., 2019) after each layer's attention-output and feed-forward-output
projections; only the adapters and the new weights train."""

from __future__ import annotations

import torch
from torch import nn

from adaptflow.errors import ConfigError
from adaptflow.models.layers import transformer_layers
from adaptflow.strategies.base import Strategy, StrategySettings, freeze_all_but


def bottleneck_adapters(model: nn.Module, settings: StrategySettings) -> Strategy:
    add_bottleneck_adapters(model, reduction=settings.adapter_reduction)
    freeze_all_but(model, lambda name: ".adapter." in f".{name}" or settings.is_new(name))
    return Strategy(model)


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))), with `up` zero-initialised so the adapted model starts as the original."""

    def __init__(self, hidden: int, reduction: int):
        super().__init__()
        self.down = nn.Linear(hidden, max(1, hidden // reduction))
        self.up = nn.Linear(max(1, hidden // reduction), hidden)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class _Adapted(nn.Module):
    """A projection followed by a bottleneck adapter (placed before the block's residual add and norm)."""

    def __init__(self, projection: nn.Module, reduction: int):
        super().__init__()
        self.projection = projection
        self.adapter = BottleneckAdapter(_out_features(projection), reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.projection(x))


def add_bottleneck_adapters(model: nn.Module, *, reduction: int = 16) -> int:
    """Houlsby-style adapters after the attention-output and feed-forward-output projections of each layer."""
    count = 0
    for layer in transformer_layers(getattr(model, "base_model", model)):
        for parent_path, child in (("attention.output", "dense"), ("output", "dense"),  # BERT family
                                   ("attn", "c_proj"), ("mlp", "c_proj"),  # GPT-2
                                   ("self_attn", "o_proj"), ("mlp", "down_proj")):  # Llama family
            parent = _get(layer, parent_path)
            projection = getattr(parent, child, None) if parent is not None else None
            if projection is not None and hasattr(projection, "weight") and not isinstance(projection, _Adapted):
                setattr(parent, child, _Adapted(projection, reduction))
                count += 1
    if not count:
        raise ConfigError(f"strategy adapters: no known projection layers in {type(model).__name__}")
    return count


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _out_features(module: nn.Module) -> int:
    # nn.Linear says so; GPT-2's Conv1D stores its weight as [in, out].
    return getattr(module, "out_features", None) or module.weight.shape[-1]
