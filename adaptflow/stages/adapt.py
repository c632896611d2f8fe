"""Adversarial domain adaptation (DANN): labelled source task + unlabelled target text → adapted classifier.

    run_adapt(config, source=TaskSplits, target=DatasetRef, ...) -> AdaptResult

The classifier trains on source labels while a discriminator behind a gradient-reversal layer learns to
tell source from target features. Published results show the gain is real on average but negative for some
domain pairs, so a negative-transfer guard trains the same model without the adversary (λ = 0, same seed
and budget) and keeps the stage's input checkpoint unless DANN does better on a target proxy.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptflow.config import AdaptConfig
from adaptflow.data import load_texts
from adaptflow.distributed import SINGLE, DeepSpeedEngine, Runtime, TorchEngine
from adaptflow.labelled import TaskSplits, load_records
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.models import checkpoint_parameter_names, load_task_model, load_tokenizer, save_checkpoint
from adaptflow.objectives.dann import (
    DANNModel,
    DomainAdversarial,
    DomainDiscriminator,
    PairedSampler,
    adversarial_weight,
)
from adaptflow.peft import apply_strategy, layer_groups, param_groups
from adaptflow.refs import CheckpointRef, DatasetRef
from adaptflow.stages.finetune import _reinitialise_pooler, encode, score
from adaptflow.train import BatchSampler, LoopSettings, MetricsSink, adamw, train

log = logging.getLogger(__name__)
STAGE = "adapt"
EVAL_BATCH = 64


@dataclass(frozen=True)
class AdaptResult:
    """`checkpoint` flows on: the adapted model if the guard accepted it, else the stage's input."""

    checkpoint: CheckpointRef
    adapted: CheckpointRef
    accepted: bool
    reason: str
    metrics: dict[str, float]

    @classmethod
    def from_dict(cls, data: dict) -> AdaptResult:
        """Back from `dataclasses.asdict` (a launched stage's JSON result)."""
        return cls(**data | {name: CheckpointRef(**data[name]) for name in ("checkpoint", "adapted")})


def adapt_cache_key(config: AdaptConfig, base: CheckpointRef, datasets: list[DatasetRef], seed: int) -> str:
    return stage_cache_key(STAGE, config.model_dump(mode="json") | {"seed": seed}, base.digest, datasets)


def run_adapt(
    config: AdaptConfig,
    *,
    source: TaskSplits,
    target: DatasetRef,
    target_heldout: DatasetRef,
    target_labelled: TaskSplits | None = None,
    base: CheckpointRef,
    work_dir: str | Path,
    seed: int = 0,
    mlflow_run_id: str | None = None,
    build_run_id: str | None = None,
    log_metrics: MetricsSink | None = None,
    progress: bool = False,
    runtime: Runtime = SINGLE,
    deepspeed: str | dict | None = None,
) -> AdaptResult:
    """DANN on `source` (labelled) and `target` (unlabelled text), then the guard; write
    `work_dir/adapt-<key>/final`. Under a launcher every rank calls this and rank 0 alone logs and saves;
    `deepspeed` (a DeepSpeed JSON config) runs both training runs under ZeRO."""
    log_metrics = (log_metrics if runtime.is_main else None) or (lambda step, metrics: None)
    datasets = [d for d in (source.train, source.validation, target, target_heldout) if d is not None]
    if target_labelled is not None:
        datasets += [d for d in (target_labelled.train, target_labelled.validation) if d is not None]
    key = adapt_cache_key(config, base, datasets, seed)
    stage_dir = Path(work_dir) / f"{STAGE}-{key}"
    labels = list(source.labels)

    tokenizer = load_tokenizer(base)  # the models themselves are built per run, in _train
    data = _AdaptData(config, tokenizer, labels, source, target, target_heldout, target_labelled, seed)
    before = _domain_probe(base, labels, data, seed, runtime.device())
    log_metrics(0, {f"{k}_before": v for k, v in before.items()})

    def run(lambda_max: float, sink: MetricsSink | None):
        return _train(config, base, labels, data, seed, sink, progress, lambda_max=lambda_max, runtime=runtime,
                      deepspeed=deepspeed)

    adapted, metrics, engine = run(config.lambda_max, log_metrics)
    metrics |= {f"{k}_before": v for k, v in before.items()}
    accepted, reason = True, "guard disabled"
    if config.guard.enabled:
        _, reference, _ = run(0.0, None)
        metrics |= {f"reference_{k}": v for k, v in reference.items() if k.startswith(("target_", "source_"))}
        accepted, reason = guard_decision(metrics, reference, tolerance=config.guard.tolerance)
        log.info("negative-transfer guard: %s (%s)", "accepted" if accepted else "rejected", reason)
    metrics["accepted"] = float(accepted)

    lineage = stage_lineage(
        STAGE, config=config.model_dump(mode="json") | {"seed": seed, "labels": labels}, cache_key=key,
        input_checkpoint=base, datasets=datasets, mlflow_run_id=mlflow_run_id, build_run_id=build_run_id,
    ) | {"metrics": metrics, "guard": {"accepted": accepted, "reason": reason}}
    final = stage_dir / "final"
    digest = ""
    with engine.full_parameters():  # ZeRO-3: whole weights on rank 0 while it saves
        if runtime.is_main:
            classifier = adapted.classifier.cpu()
            if config.strategy == "lora":
                classifier = classifier.merge_and_unload()
            digest = save_checkpoint(classifier, tokenizer, final, lineage=lineage)
    runtime.barrier()
    adapted_ref = CheckpointRef(uri=str(final), digest=digest, stage=STAGE, mlflow_run_id=mlflow_run_id)
    return AdaptResult(checkpoint=adapted_ref if accepted else base, adapted=adapted_ref, accepted=accepted,
                       reason=reason, metrics=metrics)


def guard_decision(dann: dict[str, float], reference: dict[str, float], *, tolerance: float) -> tuple[bool, str]:
    """Accept DANN only if it beats the source-only reference on the target proxy.

    With labelled target validation data the proxy is its accuracy. Without, DANN must stay within
    `tolerance` of the reference's source-validation accuracy and score at least as well on information
    maximisation over target text (confident yet diverse predictions; Shi & Sha 2012, Liang et al. 2020).
    """
    if "target_accuracy" in dann:
        ours, theirs = dann["target_accuracy"], reference["target_accuracy"]
        verdict = ours >= theirs
        return verdict, f"target validation accuracy {ours:.4f} vs source-only {theirs:.4f}"
    source_ok = dann["source_accuracy"] >= reference["source_accuracy"] - tolerance
    im_ok = dann["target_information_max"] >= reference["target_information_max"]
    return source_ok and im_ok, (
        f"source accuracy {dann['source_accuracy']:.4f} vs {reference['source_accuracy']:.4f} (tolerance "
        f"{tolerance}); target information maximisation {dann['target_information_max']:.4f} vs "
        f"{reference['target_information_max']:.4f}"
    )


class _AdaptData:
    """Every split the stage reads, tokenised once and shared by the DANN and reference runs."""

    def __init__(self, config, tokenizer, labels, source, target, target_heldout, target_labelled, seed):
        def cap(items: list) -> list:
            return _sample(items, config.max_eval_examples, seed)

        self.source_train = encode(load_records(source.train), "classification", tokenizer, config, labels)
        self.source_val = cap(encode(load_records(source.validation), "classification", tokenizer, config,
                                     labels)) if source.validation else []
        self.target_train = _encode_texts(load_texts(target), tokenizer, config.max_length)
        self.target_heldout = cap(_encode_texts(load_texts(target_heldout), tokenizer, config.max_length))
        # Labelled target data is never trained on: its validation split is the guard's proxy, its train
        # split (and test split, if any) the target numbers a report quotes.
        self.target_val, self.target_test = [], []
        if target_labelled is not None:
            if target_labelled.validation is not None:
                self.target_val = cap(encode(load_records(target_labelled.validation), "classification",
                                             tokenizer, config, labels))
            for split in (target_labelled.train, target_labelled.test):
                if split is not None:
                    self.target_test += encode(load_records(split), "classification", tokenizer, config, labels)
        if not self.source_val:
            raise ValueError("the adapt stage needs a source validation split (set validation or validation_fraction)")
        self.pad_id = tokenizer.pad_token_id
        self.labels = labels
        self.seed = seed


def _sample(items: list, limit: int, seed: int) -> list:
    """At most `limit` items, a seeded sample kept in order (not the first ones: files are often sorted by label)."""
    if len(items) <= limit:
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def _encode_texts(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": 0} for ids in enc["input_ids"]]


def _build(config: AdaptConfig, base: CheckpointRef, labels: list[str], seed: int, total_steps: int):
    model, _ = load_task_model(base, "classification", labels, seed=seed)
    pretrained = checkpoint_parameter_names(model, base.uri) - _reinitialise_pooler(model, seed)
    new = {n for n, _ in model.named_parameters() if n not in pretrained}
    for group in layer_groups(model)[: config.freeze_layers + 1 if config.freeze_layers else 0]:
        for p in group:
            p.requires_grad_(False)
    strategy = apply_strategy(model, config.strategy, kind="classification", peft_config=config.peft,
                              total_steps=total_steps, new_parameters=new, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        discriminator = DomainDiscriminator(model.config.hidden_size, config.discriminator.hidden,
                                            config.discriminator.dropout)
    return DANNModel(strategy.model, discriminator), new


def _train(config, base, labels, data: _AdaptData, seed, log_metrics, progress, *, lambda_max: float,
           runtime: Runtime, deepspeed: str | dict | None):
    model, new = _build(config, base, labels, seed, config.max_steps)
    device = runtime.device()
    model.to(device)
    objective = DomainAdversarial(data.pad_id)

    def set_weight(step: int) -> None:
        objective.weight = adversarial_weight(config.schedule, step / config.max_steps, gamma=config.gamma,
                                              maximum=lambda_max, warm_start=config.warm_start)

    named = list(model.classifier.named_parameters())
    groups = param_groups([p for n, p in named if _strip(n) not in new], config.lr, config.weight_decay, "body")
    groups += param_groups([p for n, p in named if _strip(n) in new], config.head_lr or config.lr,
                           config.weight_decay, "head")
    groups += param_groups(model.discriminator.parameters(), config.discriminator.lr or config.lr,
                           config.weight_decay, "discriminator")
    optimizer = adamw(groups, lr=config.lr)
    if deepspeed is not None:
        engine = DeepSpeedEngine(model, optimizer, runtime, config=deepspeed, micro_batch_size=config.batch_size,
                                 grad_accum_steps=1, max_grad_norm=config.max_grad_norm, bf16=config.bf16)
    else:
        engine = TorchEngine(model, optimizer, runtime, max_grad_norm=config.max_grad_norm)
    sampler = PairedSampler(
        BatchSampler(data.source_train, config.batch_size, seed,
                     lengths=[len(i["input_ids"]) for i in data.source_train]),
        BatchSampler(data.target_train, config.batch_size, seed + 1,
                     lengths=[len(i["input_ids"]) for i in data.target_train]),
    )

    def evaluate() -> dict[str, float]:
        return objective.training_stats() | evaluate_adaptation(model, data, device)

    result = train(
        model, objective, sampler, optimizer,
        LoopSettings(max_steps=config.max_steps, max_grad_norm=config.max_grad_norm, bf16=config.bf16,
                     warmup_ratio=config.warmup_ratio, log_every=config.log_every,
                     eval_every=config.eval_every or config.max_steps, seed=seed, progress=progress,
                     description=f"{STAGE} λ≤{lambda_max:g}", eval_at_start=False),
        device=device, step_hooks=[set_weight], evaluate=evaluate, log_metrics=log_metrics, runtime=runtime,
        engine=engine,
    )
    metrics = dict(result.eval_metrics)
    if data.target_test:
        from adaptflow.objectives.classification import SequenceClassification

        scores, _ = score(model.classifier, SequenceClassification(data.pad_id), data.target_test, "classification",
                          data.labels, batch_size=EVAL_BATCH, device=device)
        metrics |= {f"target_test_{k}": v for k, v in scores.items() if k in {"accuracy", "macro_f1"}}
    return model, metrics, engine


@torch.no_grad()
def evaluate_adaptation(model: DANNModel, data: _AdaptData, device) -> dict[str, float]:
    """Source task metrics, target metrics (if labelled), held-out discriminator accuracy and domain loss, a
    linear-probe domain accuracy with its proxy A-distance, and target information maximisation."""
    from adaptflow.objectives.classification import SequenceClassification

    task = SequenceClassification(data.pad_id)
    out = {f"source_{k}": v for k, v in score(model.classifier, task, data.source_val, "classification", data.labels,
                                               batch_size=EVAL_BATCH, device=device)[0].items()
           if k in {"accuracy", "macro_f1", "loss"}}
    if data.target_val:
        target_scores, _ = score(model.classifier, task, data.target_val, "classification", data.labels,
                                 batch_size=EVAL_BATCH, device=device)
        out |= {f"target_{k}": v for k, v in target_scores.items() if k in {"accuracy", "macro_f1", "loss"}}
    source_features, _ = _features(model, data.source_val, data.pad_id, device)
    target_features, target_probs = _features(model, data.target_heldout, data.pad_id, device)
    features = torch.cat([source_features, target_features])
    domains = torch.cat([torch.zeros(len(source_features)), torch.ones(len(target_features))])
    model.discriminator.eval()
    logits = model.discriminator(features.to(device)).float().cpu()
    model.train()
    out["discriminator_accuracy"] = float(((logits > 0).float() == domains).float().mean())
    out["domain_loss"] = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, domains))
    probe = linear_probe_accuracy(features.numpy(), domains.numpy(), seed=data.seed)
    out["probe_domain_accuracy"] = probe
    out["proxy_a_distance"] = 2.0 * (1.0 - 2.0 * (1.0 - probe))
    out["target_information_max"] = information_maximisation(target_probs)
    return out


def linear_probe_accuracy(features: np.ndarray, domains: np.ndarray, *, seed: int) -> float:
    """Held-out accuracy of a logistic-regression domain classifier (half the examples train it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(features, domains, test_size=0.5, random_state=seed,
                                                        stratify=domains)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_test), y_test))


def information_maximisation(probs: torch.Tensor) -> float:
    """H(mean prediction) − mean H(prediction): high when predictions are confident and diverse."""
    eps = 1e-12
    mean = probs.mean(0)
    diversity = -(mean * (mean + eps).log()).sum()
    confidence = -(probs * (probs + eps).log()).sum(1).mean()
    return float(diversity - confidence)


@torch.no_grad()
def _features(model: DANNModel, items: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from adaptflow.objectives.padding import pad_batch

    model.eval()
    features, probs = [], []
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    for start in range(0, len(order), EVAL_BATCH):
        batch = pad_batch([items[i] for i in order[start : start + EVAL_BATCH]], pad_id)
        logits, pooled = model({k: v.to(device) for k, v in batch.items()})
        features.append(pooled.float().cpu())
        probs.append(logits.float().softmax(-1).cpu())
    return torch.cat(features), torch.cat(probs)


def _domain_probe(base: CheckpointRef, labels, data: _AdaptData, seed: int, device) -> dict[str, float]:
    """Linear-probe domain accuracy and proxy A-distance of the input model's features, before the stage."""
    from adaptflow.objectives.dann import DomainDiscriminator

    model, _ = load_task_model(base, "classification", labels, seed=seed)
    _reinitialise_pooler(model, seed)  # the features the stage itself starts from
    wrapped = DANNModel(model, DomainDiscriminator(model.config.hidden_size, [1]))
    wrapped.to(device)
    source, _ = _features(wrapped, data.source_val, data.pad_id, device)
    target, _ = _features(wrapped, data.target_heldout, data.pad_id, device)
    features = torch.cat([source, target]).numpy()
    domains = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    probe = linear_probe_accuracy(features, domains, seed=seed)
    return {"probe_domain_accuracy": probe, "proxy_a_distance": 2.0 * (1.0 - 2.0 * (1.0 - probe))}


def _strip(name: str) -> str:
    from adaptflow.regularizers import base_name

    return base_name(name)
