"""How well a language model predicts held-out text, comparable across models (knowledge preservation).

- `pseudo_perplexity` for masked LMs (Salazar et al., 2020): every scored token is masked alone and predicted
  from all the others; exp of the mean negative log-likelihood. Deterministic, no sampled masks.
- `perplexity` for causal LMs (every next token), and for masked LMs under one fixed seeded mask (the cheap
  monitor the pretraining stage logs while it trains).
"""

from __future__ import annotations

import math

import torch

from adaptflow.data.corpus import load_texts
from adaptflow.data.tokenize import pack_blocks, tokenize_corpus
from adaptflow.errors import DataError
from adaptflow.models.checkpoints import load_model
from adaptflow.objectives import build_objective
from adaptflow.train.runtime import SINGLE

EVAL_SEED = 1234


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    objective,
    blocks: torch.Tensor,
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
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast:
            total += objective.loss(model, batch).double()
    if targets == 0:
        raise ValueError("no evaluation targets: the evaluation corpus is too small for one block")
    loss = total.item() / targets
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(blocks.numel())}


@torch.no_grad()
def pseudo_perplexity(
    model: torch.nn.Module,
    objective,
    blocks: torch.Tensor,
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
    scorable = ~torch.isin(blocks, torch.tensor(sorted(special_ids), dtype=blocks.dtype))
    where = scorable.nonzero()[:max_tokens]
    if len(where) == 0:
        raise ValueError("no tokens to score: the evaluation blocks hold only special tokens")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(where), batch_size):
        chunk = where[start : start + batch_size]
        rows = torch.arange(len(chunk))
        input_ids = blocks[chunk[:, 0]].clone()
        labels = torch.full_like(input_ids, -100)
        labels[rows, chunk[:, 1]] = input_ids[rows, chunk[:, 1]]
        input_ids[rows, chunk[:, 1]] = mask_id
        batch = {"input_ids": input_ids.to(device), "labels": labels.to(device)}
        total += objective.loss(model, batch).double()
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
    pseudo_tokens: int = 1024,
    cache_dir=None,
    seed: int = 0,
) -> dict[str, float]:
    """Perplexity of `base` and `candidate` (CheckpointRefs) on the same held-out blocks of each corpus:
    pseudo-perplexity over `pseudo_tokens` tokens for masked LMs, perplexity for causal LMs.

    `corpora` maps a name to the DatasetRef to evaluate on. Returns `<name>_perplexity_before`,
    `<name>_perplexity_after` and `<name>_perplexity_change_pct` (negative = the candidate is better).
    """
    device = SINGLE.device()
    metrics: dict[str, float] = {}
    blocks: dict[str, torch.Tensor] = {}
    for when, ref in (("before", base), ("after", candidate)):
        model, tokenizer = load_model(ref, objective, seed=seed)
        model.to(device)
        obj = build_objective(objective, tokenizer)
        for name, data in corpora.items():
            if name not in blocks:
                corpus = tokenize_corpus(
                    load_texts(data), tokenizer, objective=objective, cache_dir=cache_dir, dataset_digest=data.digest
                )
                blocks[name] = pack_blocks(corpus, block_size)[:max_blocks]
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
