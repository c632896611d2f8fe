"""Training objectives. Each one is a batch collator plus a loss, plugged into the one training loop.

An objective's `collate(items, generator)` turns what the sampler yields — a [batch, block] tensor of packed token
ids for the language-modelling objectives, a list of encoded examples for the task objectives (`adaptflow.kinds`),
a (source, target) pair of example lists for domain-adversarial training — into a batch dict with `n_targets`,
the number of predicted targets (or their total weight) as a plain number. `loss(model, batch)` returns the *sum*
of target losses, so the loop can normalise by the targets of a whole accumulation window.
"""

from __future__ import annotations

from typing import Protocol

import torch

from adaptflow.objectives.clm import CausalLM
from adaptflow.objectives.mlm import MaskedLM


class Objective(Protocol):
    name: str

    def collate(self, items, generator: torch.Generator | None) -> dict: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor: ...


def build_objective(name: str, tokenizer, *, mlm_probability: float = 0.15,
                    whole_word_masking: bool = False) -> Objective:
    """The language-modelling objective `name` (`mlm` or `clm`)."""
    if name == "mlm":
        return MaskedLM(tokenizer, probability=mlm_probability, whole_word=whole_word_masking)
    if name == "clm":
        return CausalLM()
    raise ValueError(f"unknown objective {name!r}; expected 'mlm' or 'clm'")


__all__ = ["CausalLM", "MaskedLM", "Objective", "build_objective"]
