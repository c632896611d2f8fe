"""Masked language modelling with dynamic masking (a fresh mask every time a block is seen), over packed blocks
whose documents attend to each other or, isolated, only to themselves."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptflow.data.blocks import PackedBatch
from adaptflow.errors import ConfigError
from adaptflow.objectives.packing import lm_inputs

IGNORE = -100


class MaskedLM:
    """BERT-style MLM: `probability` of the non-special tokens are targets; of those 80% → [MASK],
    10% → a random token, 10% unchanged. With `whole_word`, all pieces of a word are masked together."""

    name = "mlm"

    def __init__(self, tokenizer, *, probability: float = 0.15, whole_word: bool = False):
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.vocab_size = len(vocab)
        self.mask_id = tokenizer.mask_token_id
        self.probability = probability
        self.special = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.special[tokenizer.all_special_ids] = True
        self.whole_word = whole_word
        # WordPiece marks a word's continuation pieces with '##': one lookup table makes WWM vectorised.
        self.continuation = torch.tensor([t.startswith("##") for t in vocab], dtype=torch.bool)
        if whole_word and not self.continuation.any():
            raise ConfigError(
                "whole_word_masking needs a WordPiece vocabulary ('##' continuation pieces); "
                "this tokenizer has none — set stages.pretrain.whole_word_masking: false"
            )

    def collate(self, blocks: PackedBatch, generator: torch.Generator) -> dict:
        ids = blocks.input_ids.clone()
        special = self.special[ids]
        draw = torch.rand(ids.shape, generator=generator)
        if self.whole_word:
            starts = ~(self.continuation[ids] & ~special)
            # Index of the word each piece belongs to (a block may start mid-word: that piece joins word 0).
            word = (torch.cumsum(starts, dim=1) - 1).clamp_min(0)
            draw = draw.gather(1, word)  # every piece takes its word's draw
        targets = (draw < self.probability) & ~special
        labels = torch.where(targets, ids, IGNORE)

        action = torch.rand(ids.shape, generator=generator)
        ids[targets & (action < 0.8)] = self.mask_id
        random_pos = targets & (action >= 0.8) & (action < 0.9)
        ids[random_pos] = torch.randint(self.vocab_size, ids.shape, generator=generator)[random_pos]
        batch = {"input_ids": ids, "labels": labels, "n_targets": int(targets.sum())}
        if blocks.documents is not None:
            batch["documents"] = blocks.documents
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        targets = labels != IGNORE
        body, head = split_mlm_head(model)
        if head is None:
            logits = model(**lm_inputs(model, batch, causal=False)).logits[targets]
        else:
            # Project only the ~15% target positions onto the vocabulary: the vocabulary projection
            # costs about as much as the whole encoder per token, so this nearly halves the step.
            hidden = body(**lm_inputs(body, batch, causal=False)).last_hidden_state
            logits = head(hidden[targets])
        return F.cross_entropy(logits, labels[targets], reduction="sum")


def split_mlm_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(encoder, MLM head) for architectures whose head maps hidden states to logits position-wise."""
    for head_name in ("cls", "lm_head"):
        head = getattr(model, head_name, None)
        if head is not None:
            return model.base_model, head
    return model, None
