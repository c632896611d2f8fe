"""How well a language model predicts held-out text, comparable across models (knowledge preservation).

- `pseudo_perplexity` for masked LMs (Salazar et al., 2020): every scored token is masked alone and predicted
  from all the others; exp of the mean negative log-likelihood. Deterministic, no sampled masks.
- `perplexity` for causal LMs (every next token), and for masked LMs under one fixed seeded mask (the cheap
  monitor the pretraining stage logs while it trains).
"""

from __future__ import annotations

import math

import torch

from adaptflow.data.blocks import PackedBatch, PackedBlocks, Packing
from adaptflow.data.tokens import TokenStore
from adaptflow.errors import DataError
from adaptflow.models.checkpoints import load_model
from adaptflow.objectives import build_objective
from adaptflow.train.loop import to_device
from adaptflow.train.runtime import SINGLE

EVAL_SEED = 1234


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    objective,
    blocks: PackedBatch,
    *,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, float]:
    """Mean loss per target token and its exponential over `blocks`.

    For a masked LM this is the perplexity of the masked positions under one fixed seeded mask — every
    model evaluated on the same blocks sees the same masks, so before/after numbers are comparable.
    """
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    targets = 0
    generator = torch.Generator().manual_seed(EVAL_SEED)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for start in range(0, len(blocks), batch_size):
        batch = objective.collate(blocks[start : start + batch_size], generator)
        targets += batch["n_targets"]
        batch = to_device(batch, device)
        with autocast:
            total += objective.loss(model, batch).double()
    if targets == 0:
        raise ValueError("no evaluation targets: the evaluation corpus is too small for one block")
    loss = total.item() / targets
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(blocks.input_ids.numel())}


@torch.no_grad()
def pseudo_perplexity(
    model: torch.nn.Module,
    objective,
    blocks: PackedBatch,
    *,
    special_ids: set[int],
    mask_id: int,
    max_tokens: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Masked-LM pseudo-perplexity over the first `max_tokens` non-special tokens of `blocks`.

    Each scored token costs one forward pass (a copy of its block with it masked), batched `batch_size` copies
    at a time; only the masked positions go through the vocabulary projection (the objective's loss).
    """
    model.eval()
    ids, documents = blocks.input_ids, blocks.documents
    scorable = ~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype))
    where = scorable.nonzero()[:max_tokens]
    if len(where) == 0:
        raise ValueError("no tokens to score: the evaluation blocks hold only special tokens")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(where), batch_size):
        chunk = where[start : start + batch_size]
        rows = torch.arange(len(chunk))
        input_ids = ids[chunk[:, 0]].clone()
        labels = torch.full_like(input_ids, -100)
        labels[rows, chunk[:, 1]] = input_ids[rows, chunk[:, 1]]
        input_ids[rows, chunk[:, 1]] = mask_id
        batch = {"input_ids": input_ids, "labels": labels}
        if documents is not None:
            batch["documents"] = documents[chunk[:, 0]]
        total += objective.loss(model, to_device(batch, device)).double()
    loss = total.item() / len(where)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(len(where))}


def compare_perplexity(
    base,
    candidate,
    corpora: dict,
    *,
    objective: str,
    block_size: int,
    max_blocks: int,
    batch_size: int,
    store: TokenStore,
    packing: Packing | None = None,
    pseudo_tokens: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Perplexity of `base` and `candidate` (CheckpointRefs) on the same held-out blocks of each corpus:
    pseudo-perplexity over `pseudo_tokens` tokens for masked LMs, perplexity for causal LMs. Blocks come from the
    token `store`, with documents isolated as `packing` says (pretraining's setting, so both are measured as the
    model was trained).

    `corpora` maps a name to the DatasetRef to evaluate on. Returns `<name>_perplexity_before`,
    `<name>_perplexity_after` and `<name>_perplexity_change_pct` (negative = the candidate is better).
    """
    device = SINGLE.device()
    metrics: dict[str, float] = {}
    blocks: dict[str, PackedBatch] = {}
    for when, ref in (("before", base), ("after", candidate)):
        model, tokenizer = load_model(ref, objective, seed=seed)
        model.to(device)
        obj = build_objective(objective, tokenizer)
        for name, data in corpora.items():
            if name not in blocks:
                packed = PackedBlocks(store.build(data, tokenizer, objective), block_size,
                                      isolate_documents=(packing or Packing()).isolates(objective))
                blocks[name] = packed.head(max_blocks)
                if len(blocks[name]) == 0:
                    raise DataError(
                        f"evaluation corpus {name!r} ({data.uri}) has fewer than {block_size} tokens: "
                        "raise its validation_fraction or lower evaluation.block_size"
                    )
            if objective == "mlm":
                result = pseudo_perplexity(model, obj, blocks[name], special_ids=set(tokenizer.all_special_ids),
                                           mask_id=tokenizer.mask_token_id, max_tokens=pseudo_tokens,
                                           batch_size=batch_size, device=device)
            else:
                result = perplexity(model, obj, blocks[name], batch_size=batch_size, device=device)
            metrics[f"{name}_perplexity_{when}"] = result["perplexity"]
        del model
    for name in corpora:
        before, after = metrics[f"{name}_perplexity_before"], metrics[f"{name}_perplexity_after"]
        metrics[f"{name}_perplexity_change_pct"] = 100.0 * (after - before) / before
    return metrics
