"""Adversarial domain adaptation (DANN): labelled source task + unlabelled target text → adapted classifier.

    adapt.run(Config(...), Inputs(base=..., source=TaskSplits, target=..., target_heldout=...), env) -> Result

The classifier trains on source labels while a discriminator behind a gradient-reversal layer learns to
tell source from target features. Published results show the gain is real on average but negative for some
domain pairs, so a negative-transfer guard trains the same model without the adversary (λ = 0, same seed
and budget) and keeps the stage's input checkpoint unless DANN does better on a target proxy.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from adaptflow import kinds
from adaptflow.config.base import CorpusName, NonNegativeInt, PositiveFloat, PositiveInt, Reference, Section
from adaptflow.config.optimization import EvalEvery, Optimization
from adaptflow.data.corpus import load_texts
from adaptflow.data.labelled import TaskSplits, load_records
from adaptflow.evaluation.scoring import EVAL_BATCH, score
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.models.checkpoints import checkpoint_parameter_names, load_task_model, load_tokenizer, save_checkpoint
from adaptflow.models.layers import layer_groups, reinitialise_pooler
from adaptflow.objectives.dann import (
    DANNModel,
    DomainAdversarial,
    DomainDiscriminator,
    PairedSampler,
    adversarial_weight,
)
from adaptflow.objectives.padding import pad_batch
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.regularizers import base_name
from adaptflow.stages.contract import StageEnv
from adaptflow.strategies import StrategySettings, apply_strategy
from adaptflow.train import BatchSampler, adamw, loop_settings, make_engine, param_groups, train

log = logging.getLogger(__name__)
NAME = "adapt"
DISTRIBUTED = True
REUSABLE = True
LAMBDA_SCHEDULES = ("ganin", "constant", "warm_start")
ClassificationTask = Annotated[str, Reference("tasks", kind="classification")]


class DiscriminatorConfig(Section):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [100])
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    lr: PositiveFloat | None = 1e-3  # its own rate: at the encoder's rate it loses the game (see DESIGN.md)


class GuardConfig(Section):
    """Negative-transfer guard: keep the input checkpoint unless DANN beats a source-only run on the target."""

    enabled: bool = True
    tolerance: Annotated[float, Field(ge=0)] = 0.01


class Config(Optimization):
    """Adversarial domain adaptation (DANN) from a labelled source task to unlabelled target text. `schedule` is
    the learning-rate schedule, as in every training stage; the adversary's weight λ follows `lambda_schedule`."""

    resumable = False

    enabled: bool = True
    source_task: ClassificationTask
    target_corpus: CorpusName
    target_task: ClassificationTask | None = None  # labelled target data: its validation split is the guard's proxy
    strategy: Literal["full", "lora"] = "full"
    peft: dict[str, Any] = Field(default_factory=dict)
    lambda_schedule: Literal["ganin", "constant", "warm_start"] = "ganin"
    gamma: PositiveFloat = 10.0
    lambda_max: Annotated[float, Field(ge=0)] = 1.0  # 0: source-only training with a spectator discriminator
    warm_start: Annotated[float, Field(ge=0, lt=1)] = 0.1
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    freeze_layers: NonNegativeInt = 0
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: PositiveInt = 16
    max_steps: PositiveInt = 300
    lr: PositiveFloat = 3e-5
    head_lr: PositiveFloat | None = 1e-3
    eval_every: EvalEvery = 100
    max_eval_examples: PositiveInt = 1000
    guard: GuardConfig = GuardConfig()
    seed: int | None = None

    @field_validator("schedule", mode="before")
    @classmethod
    def _not_a_lambda_schedule(cls, value):
        if value in ("ganin", "warm_start"):  # what `schedule` meant here before it was the lr schedule
            raise ValueError(f"{value!r} is a λ schedule; did you mean lambda_schedule: {value}? (schedule is the "
                             "learning-rate schedule: linear, cosine or constant)")
        return value


@dataclass(frozen=True)
class Inputs(Record):
    base: CheckpointRef
    source: TaskSplits  # labelled source task (classification)
    target: DatasetRef = field(metadata={"context": "target/train"})  # unlabelled target text to align with
    target_heldout: DatasetRef = field(metadata={"context": "target/heldout"})  # for the domain probes
    # Labelled target data, never trained on: its validation split is the guard's proxy, the rest is reported.
    target_labelled: TaskSplits | None = field(default=None, metadata={"context": "target/labelled"})


@dataclass(frozen=True)
class Result(Record):
    """`checkpoint` flows on: the adapted model if the guard accepted it, else the stage's input."""

    checkpoint: CheckpointRef
    adapted: CheckpointRef
    accepted: bool
    reason: str
    metrics: dict[str, float]


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, _seed(config, seed))


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    """DANN on `inputs.source` (labelled) and `inputs.target` (unlabelled text), then the guard; write
    `<work_dir>/adapt-<key>/final`. Under a launcher every rank calls this and rank 0 alone logs and saves;
    `env.deepspeed` runs both training runs under ZeRO."""
    runtime, seed, base = env.runtime, _seed(config, env.seed), inputs.base
    key = cache_key(config, inputs, env.seed)
    stage_dir = env.stage_dir(NAME, key)
    labels = list(inputs.source.labels)

    tokenizer = load_tokenizer(base)  # the models themselves are built per run, in _train
    data = _AdaptData(config, tokenizer, labels, inputs, seed)
    before = _domain_probe(base, labels, data, seed, runtime.device())
    env.metrics(0, {f"{k}_before": v for k, v in before.items()})

    def train_once(lambda_max: float, log_metrics):
        return _train(config, base, labels, data, seed, log_metrics, env, lambda_max=lambda_max)

    adapted, metrics, engine = train_once(config.lambda_max, env.metrics)
    metrics |= {f"{k}_before": v for k, v in before.items()}
    accepted, reason = True, "guard disabled"
    if config.guard.enabled:
        _, reference, _ = train_once(0.0, None)
        metrics |= {f"reference_{k}": v for k, v in reference.items() if k.startswith(("target_", "source_"))}
        accepted, reason = guard_decision(metrics, reference, tolerance=config.guard.tolerance)
        log.info("negative-transfer guard: %s (%s)", "accepted" if accepted else "rejected", reason)
    metrics["accepted"] = float(accepted)

    lineage = stage_lineage(
        NAME, config=config.model_dump(mode="json") | {"seed": seed, "labels": labels}, cache_key=key,
        inputs=inputs, mlflow_run_id=env.mlflow_run_id, build_run_id=env.build_run_id,
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
    adapted_ref = CheckpointRef(uri=str(final), digest=digest, stage=NAME, mlflow_run_id=env.mlflow_run_id)
    return Result(checkpoint=adapted_ref if accepted else base, adapted=adapted_ref, accepted=accepted,
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

    def __init__(self, config: Config, tokenizer, labels: list[str], inputs: Inputs, seed: int):
        self.kind = kinds.get(inputs.source.kind)

        def cap(items: list) -> list:
            return _sample(items, config.max_eval_examples, seed)

        def encode(split: DatasetRef) -> list[dict]:
            return self.kind.encode(load_records(split), tokenizer, labels=labels, max_length=config.max_length,
                                    prompt_template=None)

        source, target_labelled = inputs.source, inputs.target_labelled
        self.source_train = encode(source.train)
        self.source_val = cap(encode(source.validation)) if source.validation else []
        self.target_train = _encode_texts(load_texts(inputs.target), tokenizer, config.max_length)
        self.target_heldout = cap(_encode_texts(load_texts(inputs.target_heldout), tokenizer, config.max_length))
        # Labelled target data is never trained on: its validation split is the guard's proxy, its train
        # split (and test split, if any) the target numbers a report quotes.
        self.target_val, self.target_test = [], []
        if target_labelled is not None:
            if target_labelled.validation is not None:
                self.target_val = cap(encode(target_labelled.validation))
            for split in (target_labelled.train, target_labelled.test):
                if split is not None:
                    self.target_test += encode(split)
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


def _seed(config: Config, seed: int) -> int:
    return config.seed if config.seed is not None else seed


def _build(config: Config, base: CheckpointRef, labels: list[str], kind, seed: int, total_steps: int):
    model, _ = load_task_model(base, kind.name, labels, seed=seed)
    pretrained = checkpoint_parameter_names(model, base.uri) - reinitialise_pooler(model, seed)
    new = frozenset(n for n, _ in model.named_parameters() if n not in pretrained)
    for group in layer_groups(model)[: config.freeze_layers + 1 if config.freeze_layers else 0]:
        for p in group:
            p.requires_grad_(False)
    strategy = apply_strategy(model, config.strategy, StrategySettings(
        kind=kind, section="stages.adapt", peft=config.peft, total_steps=total_steps, new_parameters=new), seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        discriminator = DomainDiscriminator(model.config.hidden_size, config.discriminator.hidden,
                                            config.discriminator.dropout)
    return DANNModel(strategy.model, discriminator), new


def _train(config: Config, base: CheckpointRef, labels: list[str], data: _AdaptData, seed: int, log_metrics,
           env: StageEnv, *, lambda_max: float):
    model, new = _build(config, base, labels, data.kind, seed, config.max_steps)
    runtime = env.runtime
    device = runtime.device()
    model.to(device)
    objective = DomainAdversarial(data.pad_id)

    def set_weight(step: int) -> None:
        objective.weight = adversarial_weight(config.lambda_schedule, step / config.max_steps, gamma=config.gamma,
                                              maximum=lambda_max, warm_start=config.warm_start)

    named = list(model.classifier.named_parameters())
    groups = param_groups([p for n, p in named if base_name(n) not in new], config.lr, config.weight_decay, "body")
    groups += param_groups([p for n, p in named if base_name(n) in new], config.head_lr or config.lr,
                           config.weight_decay, "head")
    groups += param_groups(model.discriminator.parameters(), config.discriminator.lr or config.lr,
                           config.weight_decay, "discriminator")
    optimizer = adamw(groups, lr=config.lr)
    engine = make_engine(model, optimizer, runtime, config, micro_batch_size=config.batch_size,
                         deepspeed=env.deepspeed)
    source = BatchSampler(data.source_train, config.batch_size, seed,
                          lengths=[len(i["input_ids"]) for i in data.source_train])
    sampler = PairedSampler(source, BatchSampler(data.target_train, config.batch_size, seed + 1,
                                                 lengths=[len(i["input_ids"]) for i in data.target_train]))

    def evaluate() -> dict[str, float]:
        return objective.training_stats() | evaluate_adaptation(model, data, device)

    settings = loop_settings(config, max_steps=config.max_steps, seed=seed, evaluates=True,
                             steps_per_epoch=source.per_epoch // config.grad_accum_steps, progress=env.progress,
                             description=f"{NAME} λ≤{lambda_max:g}")
    result = train(model, objective, sampler, optimizer, settings, device=device, step_hooks=[set_weight],
                   evaluate=evaluate, log_metrics=log_metrics, runtime=runtime, engine=engine)
    metrics = dict(result.eval_metrics)
    if data.target_test:
        scores, _ = score(model.classifier, data.kind, data.kind.objective(data.pad_id, data.labels), data.target_test,
                          data.labels, device=device)
        metrics |= {f"target_test_{k}": v for k, v in scores.items() if k in {"accuracy", "macro_f1"}}
    return model, metrics, engine


@torch.no_grad()
def evaluate_adaptation(model: DANNModel, data: _AdaptData, device) -> dict[str, float]:
    """Source task metrics, target metrics (if labelled), held-out discriminator accuracy and domain loss, a
    linear-probe domain accuracy with its proxy A-distance, and target information maximisation."""
    task = data.kind.objective(data.pad_id, data.labels)
    out = {f"source_{k}": v for k, v in score(model.classifier, data.kind, task, data.source_val, data.labels,
                                               device=device)[0].items()
           if k in {"accuracy", "macro_f1", "loss"}}
    if data.target_val:
        target_scores, _ = score(model.classifier, data.kind, task, data.target_val, data.labels, device=device)
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
    model, _ = load_task_model(base, data.kind.name, labels, seed=seed)
    reinitialise_pooler(model, seed)  # the features the stage itself starts from
    wrapped = DANNModel(model, DomainDiscriminator(model.config.hidden_size, [1]))
    wrapped.to(device)
    source, _ = _features(wrapped, data.source_val, data.pad_id, device)
    target, _ = _features(wrapped, data.target_heldout, data.pad_id, device)
    features = torch.cat([source, target]).numpy()
    domains = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    probe = linear_probe_accuracy(features, domains, seed=seed)
    return {"probe_domain_accuracy": probe, "proxy_a_distance": 2.0 * (1.0 - 2.0 * (1.0 - probe))}

