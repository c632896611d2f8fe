"""A model scored on a labelled split, the way its task kind scores it, and scores summarised over seeds."""

from __future__ import annotations

import statistics

import torch

from adaptflow.objectives.padding import model_inputs

EVAL_BATCH = 64


@torch.no_grad()
def score(model, kind, objective, items: list[dict], labels: list[str], *, batch_size: int = EVAL_BATCH, device,
          with_report: bool = False) -> tuple[dict[str, float], dict | None]:
    """Metrics (and optionally a report) of `model` on encoded `items`: the kind's metrics of its predictions
    (scikit-learn, seqeval), or the loss alone for a kind that predicts nothing else (SFT).

    One forward pass per batch, batches of similar length (sorted), so evaluation pads almost nothing.
    """
    model.eval()
    total, targets = 0.0, 0
    gold, predicted, probabilities = [], [], []
    predicts = hasattr(objective, "predict")
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = objective.collate([items[i] for i in order[start : start + batch_size]], None)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        total += float(objective.loss_from_logits(logits, batch))
        targets += batch["n_targets"]
        if predicts:
            p, g, probs = objective.predict(logits, batch)
            predicted += p
            gold += g
            if probs is not None:
                probabilities.append(probs)
    model.train()
    loss = total / max(1, targets)
    scores = kind.metrics(loss, gold, predicted, probabilities, labels)
    return scores, (kind.report(gold, predicted, labels, loss) if with_report else None)


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """`<metric>_mean` and `_std` (sample std; 0 for one seed) of the metrics every seed has."""
    shared = set.intersection(*(set(m) for m in per_seed.values()))
    out = {}
    for name in sorted(shared):
        values = [m[name] for m in per_seed.values()]
        out[f"{name}_mean"] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out
