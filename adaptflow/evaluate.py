"""Evaluation: language-model perplexity on held-out blocks (fixed masks, so numbers compare across models)."""

from __future__ import annotations

import math

import torch

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


def compare_perplexity(
    base,
    candidate,
    corpora: dict,
    *,
    objective: str,
    block_size: int,
    max_blocks: int,
    batch_size: int,
    cache_dir=None,
    seed: int = 0,
) -> dict[str, float]:
    """Perplexity of `base` and `candidate` (CheckpointRefs) on the same held-out blocks of each corpus.

    `corpora` maps a name to the DatasetRef to evaluate on. Returns `<name>_perplexity_before`,
    `<name>_perplexity_after` and `<name>_perplexity_change_pct` (negative = the candidate is better).
    """
    from adaptflow.data import load_texts
    from adaptflow.errors import DataError
    from adaptflow.models import load_model
    from adaptflow.objectives import build_objective
    from adaptflow.tokenize import pack_blocks, tokenize_corpus
    from adaptflow.train import pick_device

    device = pick_device()
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
            result = perplexity(model, obj, blocks[name], batch_size=batch_size, device=device)
            metrics[f"{name}_perplexity_{when}"] = result["perplexity"]
        del model
    for name in corpora:
        before, after = metrics[f"{name}_perplexity_before"], metrics[f"{name}_perplexity_after"]
        metrics[f"{name}_perplexity_change_pct"] = 100.0 * (after - before) / before
    return metrics
