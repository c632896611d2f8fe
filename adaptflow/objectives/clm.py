"""Causal language modelling: predict every next token of a packed block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CausalLM:
    name = "clm"

    def collate(self, blocks: torch.Tensor, generator: torch.Generator) -> dict:
        return {"input_ids": blocks, "n_targets": blocks.numel() - blocks.shape[0]}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
