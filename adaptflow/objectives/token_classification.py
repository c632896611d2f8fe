"""Token classification (NER): one IOB2 tag per word, learned and predicted on each word's first sub-token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptflow.objectives.padding import IGNORE, model_inputs, pad_batch


def align_labels(word_ids: list[int | None], word_tags: list[int]) -> list[int]:
    """Sub-token labels from word labels: the first piece of each word gets the word's tag; every other piece
    and every special token get IGNORE, so each word counts once in the loss and in the metrics."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else word_tags[word])
        previous = word
    return labels


class TokenClassification:
    name = "ner"

    def __init__(self, pad_id: int, id2label: list[str]):
        self.pad_id = pad_id
        self.id2label = id2label

    def collate(self, items: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["n_targets"] = int((batch["labels"] != IGNORE).sum())
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(model(**model_inputs(batch)).logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")

    def predict(self, logits: torch.Tensor, batch: dict) -> tuple[list, list, None]:
        """Per example, the predicted and gold tag sequences over the labelled (first) sub-tokens."""
        predicted = logits.argmax(-1).cpu()
        gold = batch["labels"].cpu()
        preds, golds = [], []
        for p, g in zip(predicted, gold, strict=True):
            keep = g != IGNORE
            preds.append([self.id2label[i] for i in p[keep].tolist()])
            golds.append([self.id2label[i] for i in g[keep].tolist()])
        return preds, golds, None
