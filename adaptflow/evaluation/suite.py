"""The task suite a fine-tuned checkpoint is judged by: its task's test set, labelled out-of-distribution sets,
and its robustness to seeded input noise."""

from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import Field

from adaptflow import kinds
from adaptflow.config.base import PositiveInt, Section
from adaptflow.data.labelled import load_records
from adaptflow.data.perturb import perturb_records
from adaptflow.errors import DataError
from adaptflow.evaluation.scoring import EVAL_BATCH, score
from adaptflow.models.checkpoints import load_task_model
from adaptflow.refs import CheckpointRef, DatasetRef
from adaptflow.train.runtime import SINGLE


class RobustnessConfig(Section):
    """The fine-tuned model's task metric on the test set under seeded noise, and its drop from clean."""

    perturbations: list[Literal["typos", "casing", "punctuation", "word_dropout"]] = Field(
        default_factory=lambda: ["typos", "casing", "punctuation", "word_dropout"], min_length=1)
    rate: Annotated[float, Field(gt=0, le=1)] = 0.1  # fraction of words perturbed
    max_examples: PositiveInt = 500  # a seeded sample of the test set (clean and noisy share it)


def task_suite(
    checkpoint: CheckpointRef,
    *,
    kind: str,
    labels: list[str],
    test: DatasetRef,
    max_length: int,
    prompt_template: str,
    ood: dict[str, list[DatasetRef]] | None = None,
    robustness: RobustnessConfig | None = None,
    metric: str | None = None,
    seed: int = 0,
    batch_size: int = EVAL_BATCH,
    score_test: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Scores of one fine-tuned checkpoint: `test_*` on its task's test set, `ood_<name>_*` on each labelled
    out-of-distribution set, and, with a `RobustnessConfig`, `robust_<kind>_<metric>` and `robust_<kind>_drop`
    (clean minus noisy, on one seeded sample of the test set) for each perturbation, `robustness_drop_max`
    the worst. Records are encoded as fine-tuning encoded them (`max_length`, `prompt_template`); `ood` maps
    names to the DatasetRefs whose records together form that set. `score_test=False` skips the full test set
    (when the fine-tuning stage already scored it); the robustness sample is still drawn from it.
    """
    task = kinds.get(kind)
    metric = metric or task.primary_metric
    device = SINGLE.device()
    model, tokenizer = load_task_model(checkpoint, kind, labels, trust_remote_code=trust_remote_code)
    model.to(device)
    objective = task.objective(tokenizer.pad_token_id, labels)

    def scores(records: list[dict], where: str) -> dict[str, float]:
        if unknown := task.unknown_labels(records, labels):
            raise DataError(f"{where} has labels the model does not know: {sorted(unknown)[:5]}; "
                            f"its labels are {labels}")
        items = task.encode(records, tokenizer, labels=labels, max_length=max_length, prompt_template=prompt_template)
        return score(model, task, objective, items, labels, batch_size=batch_size, device=device)[0]

    test_records = load_records(test)
    metrics = {f"test_{k}": v for k, v in scores(test_records, "the test set").items()} if score_test else {}
    for name, refs in (ood or {}).items():
        records = [record for ref in refs for record in load_records(ref)]
        metrics |= {f"ood_{name}_{k}": v for k, v in scores(records, f"OOD set {name!r}").items()}
    if robustness is not None and task.robustness:
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
