"""Forgetting regularisers: penalties pulling fine-tuned weights back toward the weights they started from.

L2-SP (Li et al., 2018): strength · Σ (w − w₀)² over the weights the model started with (not new heads).
EWC (Kirkpatrick et al., 2017): strength · Σ F · (w − w₀)², F a diagonal Fisher estimate — here the mean
squared gradient of the language-modelling loss, so weights that matter for what pretraining learned are
the ones held in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class AnchorPenalty:
    """strength · Σ importance · (w − w₀)² over `params` (name → parameter), anchored at their current values."""

    def __init__(
        self, params: dict[str, torch.nn.Parameter], strength: float, importance: dict[str, torch.Tensor] | None = None
    ):
        self.names = sorted(params)
        self.params = [params[n] for n in self.names]
        self.anchors = [p.detach().clone() for p in self.params]
        self.importance = None if importance is None else [importance[n].to(p.device) for n, p in
                                                           zip(self.names, self.params, strict=True)]
        self.strength = strength

    def __call__(self) -> torch.Tensor:
        total = self.params[0].new_zeros((), dtype=torch.float32)
        for i, (p, anchor) in enumerate(zip(self.params, self.anchors, strict=True)):
            if not p.requires_grad:  # frozen weights never leave their anchor
                continue
            diff = (p - anchor).float().pow(2)
            total = total + (diff * self.importance[i]).sum() if self.importance is not None else total + diff.sum()
        return self.strength * total


def anchored_parameters(model: torch.nn.Module, pretrained_names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    """Parameters of `model` that came from the starting checkpoint (new heads and PEFT weights excluded)."""
    known = set(pretrained_names)
    return {n: p for n, p in model.named_parameters() if base_name(n) in known}


def diagonal_fisher(
    lm_model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], batches: Iterable[dict]
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the per-target LM loss over `batches`, per parameter name."""
    lm_model.train()
    sums = {n: torch.zeros_like(p) for n, p in lm_model.named_parameters() if p.requires_grad}
    count = 0
    for batch in batches:
        lm_model.zero_grad(set_to_none=True)
        (loss_fn(lm_model, batch) / max(1, batch["n_targets"])).backward()
        for n, p in lm_model.named_parameters():
            if p.grad is not None:
                sums[n] += p.grad.detach().pow(2)
        count += 1
    lm_model.zero_grad(set_to_none=True)
    fisher = {n: s / max(1, count) for n, s in sums.items()}
    # Normalise to mean 1 so `strength` means the same for EWC and L2-SP.
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-12)
    return {n: f / mean for n, f in fisher.items()}


def base_name(name: str) -> str:
    # PEFT wraps modules (base_model.model.<name>, <module>.base_layer.weight); map back to checkpoint names.
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")
