"""The optimizer, its parameter groups and the learning-rate schedule every training stage uses."""

from __future__ import annotations

import math

import torch
from torch import nn

from adaptflow.models.layers import layer_groups


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW as one fused kernel over all parameters (CPU and CUDA). On 2 CPU cores the update of a MiniLM step
    takes 7 ms fused against 47 ms with the default multi-tensor implementation."""
    devices = {p.device.type for group in groups for p in group["params"]}
    return torch.optim.AdamW(groups, lr=lr, fused=True if devices <= {"cpu", "cuda"} else None)


def lr_factor(schedule: str, step: int, total: int, warmup_ratio: float, start: int = 0) -> float:
    """Multiplier of a group's initial lr at `step`: 0 before `start`, then linear warmup, then decay."""
    if step < start:
        return 0.0
    span = max(1, total - start)
    warmup = int(warmup_ratio * span)
    t = step - start
    if t < warmup:
        return (t + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (t - warmup) / max(1, span - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1 - progress)


def layerwise_lr_groups(model: nn.Module, lr: float, decay: float, head_lr: float | None, weight_decay: float):
    """Optimizer groups where layer l of L gets lr · decay^(L − l) (embeddings the smallest), the head `head_lr`."""
    groups = layer_groups(model)
    depth = len(groups) - 1
    grouped = {id(p) for g in groups for p in g}
    head = [p for p in model.parameters() if id(p) not in grouped]
    out = []
    for level, params in enumerate(groups):
        out += param_groups(params, lr * decay ** (depth - level), weight_decay, name=f"layer{level}")
    return out + param_groups(head, head_lr or lr, weight_decay, name="head")


def param_groups(params, lr: float, weight_decay: float, name: str) -> list[dict]:
    """`params` split into decayed (matrices) and undecayed (biases, norms) groups at `lr`.

    Frozen parameters are included on purpose: AdamW skips any without a gradient, and a schedule that
    unfreezes them later (gradual unfreezing) finds them already in the optimizer.
    """
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": name},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": name},
    ]
    return [g for g in groups if g["params"]]
