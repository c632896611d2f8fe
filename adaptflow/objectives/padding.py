"""Dynamic padding: a batch is padded to its own longest example, never to a global maximum."""

from __future__ import annotations

import torch

IGNORE = -100


def pad_batch(items: list[dict], pad_id: int) -> dict:
    """Stack variable-length `input_ids` (and `token_type_ids`, per-token `labels` if present) with right padding."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in items[0]:
        batch["token_type_ids"] = torch.zeros((len(items), width), dtype=torch.long)
    if isinstance(items[0].get("labels"), list):
        batch["labels"] = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        mask[row, :n] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][row, :n] = torch.tensor(item["token_type_ids"])
        if "labels" in batch:
            batch["labels"][row, :n] = torch.tensor(item["labels"])
    return batch


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
