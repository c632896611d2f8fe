"""Unsupervised domain adaptation: labelled source task + unlabelled target text → a classifier for the target.

    adapt.run(Config(...), Inputs(base=..., source=TaskSplits, target=..., target_heldout=...), env) -> Result

The classifier trains on source labels together with the target-side objectives the recipe picks
(`adaptflow.objectives.adaptation`): a domain adversary (DANN, or CDAN conditioned on class probabilities), moment
matching (MMD or CORAL), a masked LM on target text sharing the encoder (UDALM), self-training on class-balanced
confident pseudo-labels, and label-shift reweighting of the source loss toward the target's estimated class prior.

Published results show adaptation helps on average but hurts some domain pairs, so a negative-transfer guard also
trains a source-only reference (the same model, seed and budget, none of the target-side objectives) and the
stage's output is always a classifier of the task: the adapted one when it beats the reference on the target proxy,
the reference otherwise — never the stage's input model.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from adaptflow import kinds
from adaptflow.config.base import (
    CorpusName,
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Reference,
    Section,
)
from adaptflow.config.optimization import EvalEvery, Optimization
from adaptflow.data.corpus import load_texts
from adaptflow.data.labelled import TaskSplits, load_records
from adaptflow.errors import ConfigError
from adaptflow.evaluation.scoring import EVAL_BATCH, score
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.models.checkpoints import (
    LM_HEAD_FILE,
    checkpoint_parameter_names,
    lm_head_source,
    load_model,
    load_task_model,
    load_tokenizer,
    save_checkpoint,
)
from adaptflow.models.layers import layer_groups, reinitialise_pooler
from adaptflow.objectives.adaptation import (
    AdaptationModel,
    DomainAdaptation,
    DomainDiscriminator,
    PairedSampler,
    adversarial_weight,
    attach_mlm_head,
    class_balanced_pseudo_labels,
    conditioned,
    label_shift_weights,
)
from adaptflow.objectives.mlm import MaskedLM
from adaptflow.objectives.padding import pad_batch
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.regularizers import base_name
from adaptflow.stages.contract import Contribution, StageEnv, batch_problems
from adaptflow.strategies import StrategySettings, apply_strategy
from adaptflow.train import BatchSampler, adamw, loop_settings, make_engine, param_groups, train

log = logging.getLogger(__name__)
NAME = "adapt"
DISTRIBUTED = True
REUSABLE = True
ClassificationTask = Annotated[str, Reference("tasks", kind="classification")]


class DiscriminatorConfig(Section):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [100])
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    lr: PositiveFloat | None = 1e-3  # its own rate: at the encoder's rate it loses the game (see DESIGN.md)


class TargetMLMConfig(Section):
    """A masked LM on target text, mixed with the source task loss on the shared encoder (UDALM). The MLM head is
    the one the chain's last language model trained (after continued pretraining), else initialised from the seed.
    Needs a masked-LM encoder (BERT-like) whose tokenizer has a mask token."""

    weight: PositiveFloat = 0.5
    mlm_probability: Probability = 0.15
    whole_word_masking: bool = False
    # An untrained head (the packaged MiniLM has none) first learns alone: its loss reaches the encoder (and the
    # decoder tied to its embeddings) only after this many steps, so its first, random gradients cannot damage
    # what the encoder knows. A trained head is used at once.
    head_warmup_steps: NonNegativeInt = 0


class SelfTrainingConfig(Section):
    """Cross-entropy on pseudo-labels of confident target examples, from the model being trained. At each of
    `rounds` (fractions of the training steps) the whole target pool is labelled again, as many examples for
    every class, so the labels cannot collapse onto the class the model favours: per class, its most confident
    examples (at least `threshold`), up to `per_class` of the pool divided by the number of classes and no more
    than the class with the fewest such examples has; with `threshold: null` (top-k), the quota of each class's
    most likely."""

    rounds: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.3, 0.6], min_length=1)
    threshold: Probability | None = 0.9
    per_class: Fraction = 0.5
    weight: PositiveFloat = 1.0


class GuardConfig(Section):
    """Negative-transfer guard: the adapted classifier goes on only if it beats a source-only reference trained in
    the same stage (same model, seed and budget) on the target proxy; else the reference goes on."""

    enabled: bool = True
    tolerance: Annotated[float, Field(ge=0)] = 0.01


class Config(Optimization):
    """Domain adaptation from a labelled source task to unlabelled target text. `schedule` is the learning-rate
    schedule, as in every training stage; the adversary's weight λ follows `lambda_schedule`."""

    resumable = False

    enabled: bool = True
    source_task: ClassificationTask
    target_corpus: CorpusName
    target_task: ClassificationTask | None = None  # labelled target data: its validation split is the guard's proxy
    strategy: Literal["full", "lora"] = "full"
    peft: dict[str, Any] = Field(default_factory=dict)
    adversary: Literal["dann", "cdan", "none"] = "dann"  # none: a spectator discriminator (λ = 0)
    lambda_schedule: Literal["ganin", "constant", "warm_start"] = "ganin"
    gamma: PositiveFloat = 10.0
    lambda_max: Annotated[float, Field(ge=0)] = 1.0  # 0: no reversed gradient, as with adversary none
    warm_start: Annotated[float, Field(ge=0, lt=1)] = 0.1
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    moment_matching: Literal["mmd", "coral"] | None = None
    moment_weight: PositiveFloat = 1.0
    target_mlm: TargetMLMConfig | None = None
    self_training: SelfTrainingConfig | None = None
    # Label-shift correction: the source loss weighted by p_target(y) / p_source(y), the target prior estimated
    # from the model's predictions on target text at each self-training round (else half-way).
    reweight_source: Literal["none", "target_prior"] = "none"
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

    @model_validator(mode="before")
    @classmethod
    def _schedule_says_which(cls, data):
        """`schedule: constant` was a λ schedule before 0.2 and is an lr schedule now: a recipe that sets it must
        also set `lambda_schedule`, so an old recipe is refused rather than silently read the new way."""
        if isinstance(data, dict) and data.get("schedule") == "constant" and "lambda_schedule" not in data:
            raise ValueError("schedule: 'constant' is the learning-rate schedule since adaptflow 0.2; the λ schedule "
                             "is lambda_schedule. Set lambda_schedule too (ganin | constant | warm_start), e.g. "
                             "lambda_schedule: constant if that is what schedule meant")
        return data

    def source_only(self) -> Config:
        """The guard's reference: the same settings without any target-side objective."""
        return self.model_copy(update={"adversary": "none", "moment_matching": None, "target_mlm": None,
                                       "self_training": None, "reweight_source": "none"})

    @model_validator(mode="after")
    def _mlm_warmup_fits(self) -> Config:
        if self.target_mlm is not None and self.target_mlm.head_warmup_steps >= self.max_steps:
            raise ValueError(f"target_mlm.head_warmup_steps ({self.target_mlm.head_warmup_steps}) must be < "
                             f"max_steps ({self.max_steps}), or the masked LM never reaches the encoder")
        return self

    @property
    def relabel_at(self) -> list[float]:
        """When (fractions of training) pseudo-labels and the target prior are estimated again."""
        if self.self_training is not None:
            return sorted(self.self_training.rounds)
        return [0.5] if self.reweight_source != "none" else []


@dataclass(frozen=True)
class Inputs(Record):
    base: CheckpointRef
    source: TaskSplits  # labelled source task (classification)
    target: DatasetRef = field(metadata={"context": "target/train"})  # unlabelled target text to adapt to
    target_heldout: DatasetRef = field(metadata={"context": "target/heldout"})  # for the domain probes
    # Labelled target data, never trained on: its validation split is the guard's proxy, the rest is reported.
    target_labelled: TaskSplits | None = field(default=None, metadata={"context": "target/labelled"})


@dataclass(frozen=True)
class Result(Record):
    """`checkpoint` goes on: the adapted classifier if the guard accepted it, else the source-only reference."""

    checkpoint: CheckpointRef
    adapted: CheckpointRef
    reference: CheckpointRef | None  # None when the guard is off
    accepted: bool
    reason: str
    metrics: dict[str, float]

    @property
    def output(self) -> str:
        return "adapted" if self.checkpoint == self.adapted else "reference"


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, _seed(config, seed))


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    """Adapt on `inputs.source` (labelled) and `inputs.target` (unlabelled text), train the guard's source-only
    reference, and pass on the better on the target proxy; both are written under `<work_dir>/adapt-<key>/`. Under
    a launcher every rank calls this and rank 0 alone logs and saves; `env.deepspeed` runs both under ZeRO."""
    runtime, seed, base = env.runtime, _seed(config, env.seed), inputs.base
    key = cache_key(config, inputs, env.seed)
    stage_dir = env.stage_dir(NAME, key)
    labels = list(inputs.source.labels)

    tokenizer = load_tokenizer(base)  # the models themselves are built per run, in _train
    data = _AdaptData(config, tokenizer, labels, inputs, seed)
    before = _domain_probe(base, labels, data, seed, runtime.device())
    env.metrics(0, {f"{k}_before": v for k, v in before.items()})
    lineage = stage_lineage(NAME, config=config.model_dump(mode="json") | {"seed": seed, "labels": labels},
                            cache_key=key, inputs=inputs, mlflow_run_id=env.mlflow_run_id,
                            build_run_id=env.build_run_id)

    def train_once(settings: Config, name: str, log_metrics) -> tuple[CheckpointRef, dict[str, float]]:
        metrics = _train(settings, base, labels, data, seed, log_metrics, env, tokenizer=tokenizer,
                         out=stage_dir / name, lineage=lineage | {"model": name})
        return CheckpointRef(uri=str(stage_dir / name), digest=metrics.pop("digest"), stage=NAME,
                             mlflow_run_id=env.mlflow_run_id), metrics

    adapted, metrics = train_once(config, "adapted", env.metrics)
    metrics |= {f"{k}_before": v for k, v in before.items()}
    output, reference, accepted, reason = adapted, None, True, "guard disabled"
    if config.guard.enabled:
        if config == config.source_only():  # nothing target-side: the adapted classifier is its own reference
            reference, reference_metrics = adapted, dict(metrics)
        else:
            reference, reference_metrics = train_once(config.source_only(), "reference", None)
        metrics |= {f"reference_{k}": v for k, v in reference_metrics.items() if k.startswith(("target_", "source_"))}
        accepted, reason = guard_decision(metrics, reference_metrics, tolerance=config.guard.tolerance)
        output = adapted if accepted else reference
        log.info("negative-transfer guard: %s (%s); the %s classifier goes on", "accepted" if accepted else
                 "rejected", reason, "adapted" if accepted else "source-only reference")
    metrics["accepted"] = float(accepted)
    result = Result(checkpoint=output, adapted=adapted, reference=reference, accepted=accepted, reason=reason,
                    metrics=metrics)
    _write_decision(stage_dir, result, env)
    return result


def check_recipe(recipe) -> None:
    """A target masked LM needs a masked-LM encoder; a tiny decoder is refused here (a `model.path` is checked by
    preflight, from its config.json)."""
    tiny = recipe.model.tiny
    if recipe.stages.adapt.target_mlm is not None and tiny is not None and tiny.architecture != "bert":
        raise ValueError(f"stages.adapt.target_mlm trains a masked LM on target text, which needs an encoder; this "
                         f"recipe's model is a {tiny.architecture} decoder: use an encoder (bert), or set "
                         "stages.adapt.target_mlm: null")


def check_data(recipe, corpora: dict, tasks: dict) -> list[str]:
    config = recipe.stages.adapt
    return batch_problems(config.batch_size, "stages.adapt.batch_size", {
        f"tasks.{config.source_task} (adapt's source)": tasks[config.source_task].train.rows,
        f"corpora.{config.target_corpus} (adapt's target)": corpora[config.target_corpus].train.rows})


def describe(config: Config) -> str:
    """The objectives a run trains with, e.g. "dann λ≤0.1 + target MLM + self-training" ("source only")."""
    parts = [] if config.adversary == "none" else [f"{config.adversary} λ≤{config.lambda_max:g}"]
    parts += [config.moment_matching] if config.moment_matching else []
    parts += ["target MLM"] if config.target_mlm else []
    parts += ["self-training"] if config.self_training else []
    parts += ["label-shift reweighting"] if config.reweight_source != "none" else []
    return " + ".join(parts) or "source only"


def guard_decision(adapted: dict[str, float], reference: dict[str, float], *, tolerance: float) -> tuple[bool, str]:
    """Accept the adapted classifier only if it beats the source-only reference on the target proxy.

    With labelled target validation data the proxy is its accuracy. Without, the adapted model must stay within
    `tolerance` of the reference's source-validation accuracy and score at least as well on information
    maximisation over target text (confident yet diverse predictions; Shi & Sha 2012, Liang et al. 2020).
    """
    if "target_accuracy" in adapted:
        ours, theirs = adapted["target_accuracy"], reference["target_accuracy"]
        verdict = ours >= theirs
        return verdict, f"target validation accuracy {ours:.4f} vs source-only {theirs:.4f}"
    source_ok = adapted["source_accuracy"] >= reference["source_accuracy"] - tolerance
    im_ok = adapted["target_information_max"] >= reference["target_information_max"]
    return source_ok and im_ok, (
        f"unsupervised: source accuracy {adapted['source_accuracy']:.4f} vs {reference['source_accuracy']:.4f} "
        f"(tolerance {tolerance}); target information maximisation {adapted['target_information_max']:.4f} vs "
        f"{reference['target_information_max']:.4f}"
    )


class _AdaptData:
    """Every split the stage reads, tokenised once and shared by the adapted and reference runs."""

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
        # Labelled target data is never trained on here: its validation split is the guard's proxy and its
        # test split (its train split when it has none) the target numbers a report quotes. With a test split,
        # train is left out: a later fine-tuning stage trains on it.
        self.target_val, self.target_test = [], []
        if target_labelled is not None:
            if target_labelled.validation is not None:
                self.target_val = cap(encode(target_labelled.validation))
            self.target_test = encode(target_labelled.test or target_labelled.train)
        if not self.source_val:
            raise ValueError("the adapt stage needs a source validation split (set validation or validation_fraction)")
        self.source_prior = np.bincount([item["label"] for item in self.source_train], minlength=len(labels))
        self.source_prior = self.source_prior / self.source_prior.sum()
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
    return [{"input_ids": ids, "label": 0, "index": i} for i, ids in enumerate(enc["input_ids"])]


def _seed(config: Config, seed: int) -> int:
    return config.seed if config.seed is not None else seed


def _build(config: Config, base: CheckpointRef, labels: list[str], kind, seed: int):
    model, _ = load_task_model(base, kind.name, labels, seed=seed)
    pretrained = checkpoint_parameter_names(model, base.uri) - reinitialise_pooler(model, seed)
    new = frozenset(n for n, _ in model.named_parameters() if n not in pretrained)
    mlm_head, mlm_warmup = None, 0
    if config.target_mlm is not None:  # the MLM head of the chain's last language model, when it has one
        trained_head = lm_head_source(base)
        lm_model, _ = load_model(base, "mlm", seed=seed, head_from=trained_head)
        mlm_head = attach_mlm_head(model, lm_model)
        mlm_warmup = 0 if trained_head is not None else config.target_mlm.head_warmup_steps
        log.info("target MLM head %s", f"from {trained_head}" if trained_head is not None else
                 f"untrained: it learns alone for {mlm_warmup} steps before its loss reaches the encoder")
    for group in layer_groups(model)[: config.freeze_layers + 1 if config.freeze_layers else 0]:
        for p in group:
            p.requires_grad_(False)
    strategy = apply_strategy(model, config.strategy, StrategySettings(
        kind=kind, section="stages.adapt", peft=config.peft, total_steps=config.max_steps, new_parameters=new),
        seed=seed)
    features = model.config.hidden_size * (len(labels) if config.adversary == "cdan" else 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        discriminator = DomainDiscriminator(features, config.discriminator.hidden, config.discriminator.dropout)
    model = AdaptationModel(strategy.model, discriminator, mlm_head, conditional=config.adversary == "cdan")
    return model, new, mlm_warmup


def _train(config: Config, base: CheckpointRef, labels: list[str], data: _AdaptData, seed: int, log_metrics,
           env: StageEnv, *, tokenizer, out, lineage: dict) -> dict[str, float]:
    """Train one classifier with `config`'s objectives, evaluate it, and save it (rank 0) to `out`; its metrics,
    with the saved checkpoint's `digest`."""
    model, new, mlm_warmup = _build(config, base, labels, data.kind, seed)
    runtime = env.runtime
    device = runtime.device()
    model.to(device)
    mlm = config.target_mlm
    objective = DomainAdaptation(
        data.pad_id, conditional=config.adversary == "cdan", moment=config.moment_matching,
        moment_weight=config.moment_weight, mlm_weight=mlm.weight if mlm else 0.0,
        masker=MaskedLM(tokenizer, probability=mlm.mlm_probability, whole_word=mlm.whole_word_masking) if mlm else None,
        pseudo_weight=config.self_training.weight if config.self_training else 0.0,
    )
    lambda_max = 0.0 if config.adversary == "none" else config.lambda_max
    relabel_steps = {max(1, round(at * config.max_steps)) for at in config.relabel_at}

    def before_step(step: int) -> None:
        objective.weight = adversarial_weight(config.lambda_schedule, step / config.max_steps, gamma=config.gamma,
                                              maximum=lambda_max, warm_start=config.warm_start)
        objective.mlm_reaches_encoder = step >= mlm_warmup
        if step in relabel_steps:
            relabelled = _relabel(model, objective, config, data, device)
            (log_metrics or (lambda s, m: None))(step, relabelled)

    named = list(model.classifier.named_parameters())
    groups = param_groups([p for n, p in named if base_name(n) not in new], config.lr, config.weight_decay, "body")
    groups += param_groups([p for n, p in named if base_name(n) in new], config.head_lr or config.lr,
                           config.weight_decay, "head")
    if model.mlm_head is not None:  # the tied decoder is the embedding matrix, which the body group holds
        encoder = {id(p) for p in model.classifier.parameters()}
        groups += param_groups([p for p in model.mlm_head.parameters() if id(p) not in encoder],
                               config.head_lr or config.lr, config.weight_decay, "mlm_head")
    groups += param_groups(model.discriminator.parameters(), config.discriminator.lr or config.lr,
                           config.weight_decay, "discriminator")
    optimizer = adamw(groups, lr=config.lr)
    engine = make_engine(model, optimizer, runtime, config, micro_batch_size=config.batch_size,
                         deepspeed=env.deepspeed)
    if mlm_warmup and engine.zero_stage == 3:  # the warm-up holds the tied decoder fixed by a detached copy
        raise ConfigError("stages.adapt.target_mlm warms up an untrained MLM head with the decoder tied to the "
                          "encoder's embeddings held fixed, which ZeRO-3's partitioned weights do not allow: use "
                          "ZeRO-2 (infra/deepspeed/zero2.json), pretrain first (its head is then trained), or set "
                          "target_mlm.head_warmup_steps: 0")
    source = BatchSampler(data.source_train, config.batch_size, seed,
                          lengths=[len(i["input_ids"]) for i in data.source_train])
    sampler = PairedSampler(source, BatchSampler(data.target_train, config.batch_size, seed + 1,
                                                 lengths=[len(i["input_ids"]) for i in data.target_train]))

    def evaluate() -> dict[str, float]:
        return objective.training_stats() | evaluate_adaptation(model, data, device)

    settings = loop_settings(config, max_steps=config.max_steps, seed=seed, evaluates=True,
                             steps_per_epoch=source.per_epoch // config.grad_accum_steps, progress=env.progress,
                             description=f"{NAME} ({describe(config)})")
    result = train(model, objective, sampler, optimizer, settings, device=device, step_hooks=[before_step],
                   evaluate=evaluate, log_metrics=log_metrics, runtime=runtime, engine=engine)
    metrics = dict(result.eval_metrics)
    if data.target_test:
        scores, _ = score(model.classifier, data.kind, data.kind.objective(data.pad_id, data.labels), data.target_test,
                          data.labels, device=device)
        metrics |= {f"target_test_{k}": v for k, v in scores.items() if k in {"accuracy", "macro_f1"}}
    metrics["digest"] = _save(model, config, tokenizer, out, lineage | {"metrics": metrics}, engine, runtime)
    return metrics


def _save(model: AdaptationModel, config: Config, tokenizer, out, lineage: dict, engine, runtime) -> str:
    """The classifier as a Hugging Face checkpoint (LoRA merged); with a target MLM, its MLM head beside it."""
    digest = ""
    with engine.full_parameters():  # ZeRO-3: whole weights on rank 0 while it saves
        if runtime.is_main:
            classifier = model.classifier.cpu()
            if config.strategy == "lora":
                classifier = classifier.merge_and_unload()
            extra = {}
            if model.mlm_head is not None:
                embeddings = classifier.get_input_embeddings().weight
                extra[LM_HEAD_FILE] = {f"{model.mlm_head.prefix}.{n}": p.detach().cpu()
                                        for n, p in model.mlm_head.named_parameters() if p is not embeddings}
            digest = save_checkpoint(classifier, tokenizer, out, lineage=lineage, extra_files=extra)
    runtime.barrier()
    return digest


@torch.no_grad()
def _relabel(model: AdaptationModel, objective: DomainAdaptation, config: Config, data: _AdaptData,
             device) -> dict[str, float]:
    """Pseudo-label the target pool (self-training) and re-estimate the target prior (label-shift correction)
    with the model as it is now; what was chosen, and how accurate the same rule is on the labelled target proxy."""
    _, probabilities = _features(model, data.target_train, data.pad_id, device)
    probabilities = probabilities.numpy()
    stats: dict[str, float] = {}
    classes = len(data.labels)
    if config.self_training is not None:
        rule = config.self_training
        quota = int(rule.per_class * len(probabilities) / classes)
        objective.pseudo_labels = class_balanced_pseudo_labels(probabilities, threshold=rule.threshold,
                                                               per_class=quota)
        chosen = objective.pseudo_labels != -1
        stats["pseudo_labelled_fraction"] = float(chosen.mean())
        if not chosen.any():
            log.warning("self-training: no target example is pseudo-labelled this round (some class has none at "
                        "confidence ≥ %s, and every class gets as many); lower the threshold or use top-k "
                        "(threshold: null)", rule.threshold)
        stats |= {f"pseudo_labelled.{data.labels[c]}": float((objective.pseudo_labels == c).sum())
                  for c in range(classes)}
        if data.target_val:
            _, proxy = _features(model, data.target_val, data.pad_id, device)
            picked = class_balanced_pseudo_labels(proxy.numpy(), threshold=rule.threshold,
                                                  per_class=int(rule.per_class * len(proxy) / classes))
            gold = np.array([item["label"] for item in data.target_val])
            stats["proxy_pseudo_labelled_fraction"] = float((picked != -1).mean())
            if (picked != -1).any():
                stats["proxy_pseudo_label_accuracy"] = float((picked[picked != -1] == gold[picked != -1]).mean())
    if config.reweight_source == "target_prior":
        prior = probabilities.mean(0)
        weights = label_shift_weights(prior, data.source_prior)
        objective.class_weights = torch.tensor(weights, dtype=torch.float32)
        stats |= {f"target_prior.{data.labels[c]}": float(prior[c]) for c in range(classes)}
        stats |= {f"source_weight.{data.labels[c]}": float(weights[c]) for c in range(classes)}
        if data.target_val:
            gold = np.bincount([item["label"] for item in data.target_val], minlength=classes) / len(data.target_val)
            stats["target_prior_error"] = float(np.abs(prior - gold).sum() / 2)  # total variation to the proxy's
    log.info("relabelled the target pool: %s", ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    return stats


@torch.no_grad()
def evaluate_adaptation(model: AdaptationModel, data: _AdaptData, device) -> dict[str, float]:
    """Source task metrics, target metrics (if labelled), held-out discriminator accuracy and domain loss, a
    linear-probe domain accuracy with its proxy A-distance, and target information maximisation."""
    task = data.kind.objective(data.pad_id, data.labels)
    out = {f"source_{k}": v for k, v in score(model.classifier, data.kind, task, data.source_val, data.labels,
                                               device=device)[0].items()
           if k in {"accuracy", "macro_f1", "loss"}}
    if data.target_val:
        target_scores, _ = score(model.classifier, data.kind, task, data.target_val, data.labels, device=device)
        out |= {f"target_{k}": v for k, v in target_scores.items() if k in {"accuracy", "macro_f1", "loss"}}
    source_features, source_probs = _features(model, data.source_val, data.pad_id, device)
    target_features, target_probs = _features(model, data.target_heldout, data.pad_id, device)
    features = torch.cat([source_features, target_features])
    features_in = conditioned(features, torch.cat([source_probs, target_probs])) if model.conditional else features
    domains = torch.cat([torch.zeros(len(source_features)), torch.ones(len(target_features))])
    model.discriminator.eval()
    logits = model.discriminator(features_in.to(device)).float().cpu()
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
def _features(model: AdaptationModel, items: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and class probabilities of `items`, in their order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    chunks_f, chunks_p = [], []
    for start in range(0, len(order), EVAL_BATCH):
        batch = pad_batch([items[i] for i in order[start : start + EVAL_BATCH]], pad_id)
        logits, pooled = model({k: v.to(device) for k, v in batch.items()})
        chunks_f.append(pooled.float().cpu())
        chunks_p.append(logits.float().softmax(-1).cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    features, probs = torch.cat(chunks_f)[inverse], torch.cat(chunks_p)[inverse]
    model.train(was_training)
    return features, probs


def _domain_probe(base: CheckpointRef, labels, data: _AdaptData, seed: int, device) -> dict[str, float]:
    """Linear-probe domain accuracy and proxy A-distance of the input model's features, before the stage."""
    model, _ = load_task_model(base, data.kind.name, labels, seed=seed)
    reinitialise_pooler(model, seed)  # the features the stage itself starts from
    wrapped = AdaptationModel(model, DomainDiscriminator(model.config.hidden_size, [1]))
    wrapped.to(device)
    source, _ = _features(wrapped, data.source_val, data.pad_id, device)
    target, _ = _features(wrapped, data.target_heldout, data.pad_id, device)
    features = torch.cat([source, target]).numpy()
    domains = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    probe = linear_probe_accuracy(features, domains, seed=seed)
    return {"probe_domain_accuracy": probe, "proxy_a_distance": 2.0 * (1.0 - 2.0 * (1.0 - probe))}


def _write_decision(stage_dir, result: Result, env: StageEnv) -> None:
    """The guard's decision beside both classifiers (rank 0)."""
    if env.runtime.is_main:
        (stage_dir / "guard.json").write_text(json.dumps({"accepted": result.accepted, "reason": result.reason,
                                                          "output": result.output, "metrics": result.metrics},
                                                         indent=2))



def contribution(config: Config, result: Result) -> Contribution | None:
    """Target accuracy (of the test split, else of the guard's proxy) of the source-only reference and of the
    classifier the stage hands on: zero gain when the guard rejected the adaptation. Needs labelled target data
    and the guard (without a reference there is nothing to compare with)."""
    metrics = result.metrics
    for split, name in (("target_test", "test"), ("target", "proxy")):
        if f"reference_{split}_accuracy" in metrics:
            after = metrics[f"{split}_accuracy" if result.output == "adapted" else f"reference_{split}_accuracy"]
            return Contribution(f"{config.target_task} {name} accuracy (source-only → {result.output})",
                                metrics[f"reference_{split}_accuracy"], after)
    return None


def guard_gate(result: Result) -> dict:
    """The guard's comparison as a promotion gate: passed when the adapted classifier beat the source-only
    reference on the target proxy (a rejected adaptation hands on the reference, but the build did not adapt)."""
    metric = "target_accuracy" if "target_accuracy" in result.metrics else "target_information_max"
    return {"name": "adaptation_beats_source_only", "value": result.metrics.get(metric),
            "threshold": result.metrics.get(f"reference_{metric}"), "passed": result.accepted,
            "reason": result.reason}
