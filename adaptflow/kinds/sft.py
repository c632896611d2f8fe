"""Instruction SFT for decoders: prompt + response in a template, loss on the response tokens only."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptflow.errors import ConfigError
from adaptflow.objectives.padding import IGNORE, model_inputs, pad_batch

DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # Alpaca's, without the preamble


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


class InstructionTuning:
    name = "sft"
    primary_metric = "loss"
    higher_is_better = False
    auto_model = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    pipeline_task = "text-generation"
    has_head = False
    single_label = False
    robustness = False
    file_format = "records"

    def columns(self, config) -> dict[str, str]:
        return {"prompt": "prompt_field", "response": "response_field"}

    def schema(self, config):
        import pyarrow as pa

        return pa.schema([("prompt", pa.string()), ("response", pa.string())])

    def labels_of(self, record: dict) -> list[str]:
        return []

    def label_order(self, seen: set[str]) -> tuple[str, ...]:
        return ()

    def unknown_labels(self, records: list[dict], labels: list[str]) -> set[str]:
        return set()

    def text(self, record: dict) -> str:
        return f"{record['prompt']}\n{record['response']}"

    def encode(self, records, tokenizer, *, labels, max_length, prompt_template) -> list[dict]:
        return [encode_sft(tokenizer, r["prompt"], r["response"], template=prompt_template, max_length=max_length)
                for r in records]

    def objective(self, pad_id: int, labels: list[str], *, balance_over: list[dict] | None = None):
        return InstructionSFT(pad_id)

    def sample_weights(self, items: list[dict]):
        raise ConfigError("stages.finetune.sampler: balanced needs single-label examples (classification)")

    def metrics(self, loss, gold, predicted, probabilities, labels) -> dict[str, float]:
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}

    def report(self, gold, predicted, labels, loss) -> dict:
        return {"loss": loss}

    def report_files(self, report: dict, labels: list[str], directory: Path) -> list[Path]:
        return []


SFT = InstructionTuning()
