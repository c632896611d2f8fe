"""Causal language modelling: predict every next token of a packed block. With isolated documents a document's
first token is no target (nothing of its own precedes it) and attention is block-causal."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptflow.data.blocks import PackedBatch
from adaptflow.objectives.packing import lm_inputs

IGNORE = -100


class CausalLM:
    name = "clm"

    def collate(self, blocks: PackedBatch, generator: torch.Generator) -> dict:
        ids = blocks.input_ids
        if blocks.documents is None:
            return {"input_ids": ids, "n_targets": ids.numel() - ids.shape[0]}
        documents = blocks.documents
        labels = torch.where(documents[:, 1:] == documents[:, :-1], ids[:, 1:], IGNORE)
        return {"input_ids": ids, "documents": documents, "labels": labels, "n_targets": int((labels != IGNORE).sum())}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = model(**lm_inputs(model, batch, causal=True)).logits[:, :-1]
        labels = batch.get("labels", ids[:, 1:])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                               ignore_index=IGNORE)
