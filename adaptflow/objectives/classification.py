"""Single-label sequence classification (binary or multi-class; optional text pairs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptflow.objectives.padding import model_inputs, pad_batch


class SequenceClassification:
    name = "classification"

    def __init__(self, pad_id: int, class_weights: torch.Tensor | None = None):
        self.pad_id = pad_id
        self.class_weights = class_weights

    def collate(self, items: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["labels"] = labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        # With class weights the loss is a weighted mean, so the normaliser is the weights' sum.
        batch["n_targets"] = len(items) if self.class_weights is None else float(self.class_weights[labels].sum())
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(model(**model_inputs(batch)).logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        return F.cross_entropy(logits, batch["labels"], weight=weight, reduction="sum")

    def predict(self, logits: torch.Tensor, batch: dict) -> tuple[list, list, torch.Tensor]:
        """(predicted ids, gold ids, class probabilities) for one batch."""
        probs = logits.float().softmax(-1)
        return probs.argmax(-1).tolist(), batch["labels"].tolist(), probs.cpu()
