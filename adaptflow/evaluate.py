"""Evaluation: how well a language model predicts held-out text, comparable across models.

- `pseudo_perplexity` for masked LMs (Salazar et al., 2020): every scored token is masked alone and predicted
  from all the others; exp of the mean negative log-likelihood. Deterministic, no sampled masks.
- `perplexity` for causal LMs (every next token), and for masked LMs under one fixed seeded mask (the cheap
  monitor the pretraining stage logs while it trains).
"""

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


def task_suite(
    checkpoint,
    config,
    *,
    kind: str,
    labels: list[str],
    test,
    ood: dict | None = None,
    robustness=None,
    metric: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    score_test: bool = True,
) -> dict[str, float]:
    """Scores of one fine-tuned checkpoint: `test_*` on its task's test set, `ood_<name>_*` on each labelled
    out-of-distribution set, and, with a `RobustnessConfig`, `robust_<kind>_<metric>` and `robust_<kind>_drop`
    (clean minus noisy, on one seeded sample of the test set) for each perturbation, `robustness_drop_max`
    the worst. `config` is the fine-tuning config (max_length, prompt template); `ood` maps names to the
    DatasetRefs whose records together form that set. `score_test=False` skips the full test set (when the
    fine-tuning stage already scored it); the robustness sample is still drawn from it.
    """
    import random

    from adaptflow.errors import DataError
    from adaptflow.labelled import load_records
    from adaptflow.models import load_task_model
    from adaptflow.perturb import perturb_records
    from adaptflow.stages.finetune import encode, eval_objective, score
    from adaptflow.train import pick_device

    metric = metric or primary_metric(kind)
    device = pick_device()
    model, tokenizer = load_task_model(checkpoint, kind, labels)
    model.to(device)
    objective = eval_objective(kind, tokenizer, labels)

    def scores(records: list[dict], where: str) -> dict[str, float]:
        unknown = {r["label"] for r in records if "label" in r} - set(labels)
        unknown |= {t[2:] for r in records for t in r.get("tags", ()) if t != "O"} - {
            t[2:] for t in labels if t != "O"}
        if unknown:
            raise DataError(f"{where} has labels the model does not know: {sorted(unknown)[:5]}; "
                            f"its labels are {labels}")
        items = encode(records, kind, tokenizer, config, labels)
        return score(model, objective, items, kind, labels, batch_size=batch_size, device=device)[0]

    test_records = load_records(test)
    metrics = {f"test_{k}": v for k, v in scores(test_records, "the test set").items()} if score_test else {}
    for name, refs in (ood or {}).items():
        records = [record for ref in refs for record in load_records(ref)]
        metrics |= {f"ood_{name}_{k}": v for k, v in scores(records, f"OOD set {name!r}").items()}
    if robustness is not None and kind != "sft":
        sample = test_records
        if len(sample) > robustness.max_examples:
            picked = sorted(random.Random(seed).sample(range(len(sample)), robustness.max_examples))
            sample = [sample[i] for i in picked]
        clean = scores(sample, "the test sample")[metric]
        metrics[f"robust_clean_{metric}"] = clean
        for perturbation in robustness.perturbations:
            noisy = scores(perturb_records(sample, perturbation, rate=robustness.rate, seed=seed),
                           f"the {perturbation} test sample")[metric]
            metrics[f"robust_{perturbation}_{metric}"] = noisy
            metrics[f"robust_{perturbation}_drop"] = clean - noisy
        metrics["robustness_drop_max"] = max(metrics[f"robust_{p}_drop"] for p in robustness.perturbations)
    return metrics


def primary_metric(kind: str) -> str:
    """The metric robustness drops and gates read by default: macro-F1 for classes, entity F1 for NER."""
    return {"classification": "macro_f1", "ner": "entity_f1", "sft": "loss"}[kind]


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """`<metric>_mean` and `_std` (sample std; 0 for one seed) of the metrics every seed has."""
    import statistics

    shared = set.intersection(*(set(m) for m in per_seed.values()))
    out = {}
    for name in sorted(shared):
        values = [m[name] for m in per_seed.values()]
        out[f"{name}_mean"] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out
