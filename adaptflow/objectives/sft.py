"""Instruction SFT for decoders: prompt + response in a template, loss on the response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptflow.objectives.padding import IGNORE, model_inputs, pad_batch


def encode_sft(tokenizer, prompt: str, response: str, *, template: str, max_length: int) -> dict:
    """Token ids of `template(prompt) + response + eos`, with the prompt part masked out of the labels.

    The prompt is kept whole when truncating (the response is cut), so the model always sees the instruction.
    """
    prompt_ids = tokenizer(template.format(prompt=prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[: max_length - 1]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}


class InstructionSFT:
    name = "sft"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, items: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["n_targets"] = int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(model(**model_inputs(batch)).logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
