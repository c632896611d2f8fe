"""Model inputs for packed blocks whose documents are isolated: positions restart at every document, and attention
stays inside it — through the attention path each architecture supports.

- Causal LMs: restarting `position_ids` and no attention mask. Transformers reads a packed sequence from the
  restarts and builds the block-causal mask itself (and, on GPU with flash attention, runs padding-free varlen
  kernels from the same input), so nothing B×L×L is built here.
- Masked LMs (bidirectional): transformers reads no packing from positions, so a 4D block-diagonal mask goes in,
  boolean for SDPA/flex kernels, additive for eager attention.
"""

from __future__ import annotations

import torch


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document (documents given as [blocks, length] indices within a block)."""
    span = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, span, torch.zeros_like(span)).cummax(dim=1).values
    return span - first


def isolating_mask(model: torch.nn.Module, documents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[blocks, 1, L, L] attention mask letting a token attend only to tokens of its own document."""
    same = (documents[:, None, :, None] == documents[:, None, None, :])
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") != "eager":
        return same
    return torch.zeros(same.shape, dtype=dtype, device=documents.device).masked_fill_(~same, torch.finfo(dtype).min)


def lm_inputs(model: torch.nn.Module, batch: dict, *, causal: bool) -> dict:
    """Keyword inputs for `model` from a collated LM batch (`input_ids`, and `documents` when isolating)."""
    inputs = {"input_ids": batch["input_ids"]}
    documents = batch.get("documents")
    if documents is None:
        return inputs
    inputs["position_ids"] = document_positions(documents)
    if causal:
        inputs["use_cache"] = False  # a cache hides the packed sequence from transformers' mask builder
    else:
        dtype = next(model.parameters()).dtype
        inputs["attention_mask"] = isolating_mask(model, documents, dtype)
    return inputs
