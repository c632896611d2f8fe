"""Task fine-tuning: sequence classification, NER or instruction SFT (the task's kind), with one strategy.

    finetune.run(Config(...), Inputs(base=..., task=TaskSplits), env) -> Result   # one seed: env.seed

The stage starts from the previous stage's checkpoint (its LM head dropped, a task head initialised from the
seed), trains on the task's training split with dynamic padding and length-grouped batches, evaluates the
validation split (early stopping, restore-best), then reports test metrics and writes a Hugging Face
checkpoint; PEFT results are saved both as the adapter alone (`adapter/`) and merged into the full model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from adaptflow import kinds
from adaptflow.config.base import PositiveFloat, PositiveInt, Reference, Section, TaskName, one_of
from adaptflow.config.optimization import EvalEvery, Optimization
from adaptflow.data.blocks import PackedBlocks, Packing, pack_texts
from adaptflow.data.labelled import TaskSplits, load_records
from adaptflow.errors import ConfigError, DataError
from adaptflow.evaluation.scoring import aggregate, score
from adaptflow.kinds.sft import DEFAULT_PROMPT_TEMPLATE
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.models.checkpoints import (
    checkpoint_parameter_names,
    head_labels,
    infer_objective,
    lm_head_source,
    load_model,
    load_task_model,
    save_checkpoint,
)
from adaptflow.models.layers import is_head, reinitialise_head, reinitialise_pooler
from adaptflow.objectives import build_objective
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.regularizers import AnchorPenalty, anchored_parameters, base_name, diagonal_fisher
from adaptflow.stages.contract import Contribution, StageEnv, batch_problems
from adaptflow.strategies import STRATEGIES, StrategySettings, apply_strategy, trainable_fraction
from adaptflow.train import BatchSampler, EarlyStopping, adamw, loop_settings, make_engine, param_groups, train
from adaptflow.train.optim import layerwise_lr_groups

log = logging.getLogger(__name__)
NAME = "finetune"
FISHER_BLOCK = 128  # tokens per block of EWC's Fisher text (fewer when the model's positions are fewer)
DISTRIBUTED = True
REUSABLE = True


class RegularizerConfig(Section):
    """Pull fine-tuned weights toward the starting ones: L2-SP (uniform) or EWC (weighted by a diagonal Fisher
    of the language-modelling loss on `fisher_corpus` — a corpus name, or `task` for the task's training text)."""

    type: Literal["l2sp", "ewc"]
    strength: PositiveFloat = 0.01
    fisher_corpus: Annotated[str, Reference("corpora", special=("task",))] = "task"
    fisher_batches: PositiveInt = 8


class EarlyStoppingConfig(Section):
    metric: str = "macro_f1"
    mode: Literal["max", "min"] = "max"
    patience: PositiveInt = 3
    restore_best: bool = True


class Config(Optimization):
    """Task fine-tuning with one strategy (full, a PEFT method, adapters, feature extraction, gradual unfreezing)."""

    resumable = False

    enabled: bool = True
    task: TaskName
    strategy: str = "full"  # a name in adaptflow.strategies.STRATEGIES
    peft: dict[str, Any] = Field(default_factory=dict)
    adapter_reduction: PositiveInt = 16
    reinit_pooler: bool = True  # a carried head that is kept keeps the pooler it reads, whatever this says
    # A task head the starting checkpoint already has (an adapted classifier's, for the same labels) starts
    # afresh from the seed (`reinitialise`) or keeps its weights and its pooler (`keep`: the features adaptation
    # aligned); either way it trains as a new head (head_lr, never anchored by L2-SP/EWC).
    carried_head: Literal["reinitialise", "keep"] = "reinitialise"
    unfreeze_every: PositiveInt = 50
    layerwise_lr_decay: Annotated[float, Field(gt=0, le=1)] | None = None
    regularizer: RegularizerConfig | None = None
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: PositiveInt = 16
    epochs: PositiveFloat | None = 3
    max_steps: PositiveInt | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    group_by_length: bool = True
    class_weights: Literal["none", "balanced"] = "none"
    sampler: Literal["random", "balanced"] = "random"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    eval_every: EvalEvery = "epoch"
    early_stopping: EarlyStoppingConfig | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    select_seed: Literal["best"] | int = "best"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return one_of(value, STRATEGIES)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> Config:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        if isinstance(self.select_seed, int) and self.select_seed not in self.seeds:
            raise ValueError(f"select_seed {self.select_seed} is not one of seeds {self.seeds}")
        return self


@dataclass(frozen=True)
class Inputs(Record):
    base: CheckpointRef
    task: TaskSplits = field(metadata={"context": ""})  # logged as train, validation, test
    fisher: DatasetRef | None = None  # EWC's Fisher text when `regularizer.fisher_corpus` names a corpus


@dataclass(frozen=True)
class Result(Record):
    """The checkpoint, its metrics (`val_*` of the kept weights, `test_*`) and report files to keep."""

    checkpoint: CheckpointRef
    seed: int
    metrics: dict[str, float]
    selection_metric: str
    selection_mode: str
    reports: tuple[str, ...] = ()

    @property
    def selection_value(self) -> float:
        """The validation score seeds are chosen by (the worst possible one when there was no validation)."""
        worst = float("-inf") if self.selection_mode == "max" else float("inf")
        return self.metrics.get(f"val_{self.selection_metric}", worst)


def selection(config: Config, kind: str) -> tuple[str, str]:
    """The validation metric (and direction) that early stopping and seed selection use."""
    if config.early_stopping is not None:
        return config.early_stopping.metric, config.early_stopping.mode
    task = kinds.get(kind)
    return task.primary_metric, "max" if task.higher_is_better else "min"


def check_data(recipe, corpora: dict, tasks: dict) -> list[str]:
    config = recipe.stages.finetune
    problems = []
    # Self-Instruct and active learning change the fine-tuning set later; the loop checks it then.
    if recipe.enabled("self_instruct") is None and recipe.enabled("active_learning") is None:
        problems += batch_problems(config.batch_size, "stages.finetune.batch_size",
                                   {f"tasks.{config.task} (finetune)": tasks[config.task].train.rows})
    if config.carried_head == "keep" and (carried := _carried_labels(recipe, tasks)) is not None:
        source, labels = carried
        if labels != list(tasks[config.task].labels):
            problems.append(f"stages.finetune.carried_head: keep, but {source} predicts {labels}, not "
                            f"tasks.{config.task}'s {list(tasks[config.task].labels)}; set carried_head: reinitialise")
    return problems


def _carried_labels(recipe, tasks: dict) -> tuple[str, list[str]] | None:
    """(what, labels) of the task head fine-tuning's input will carry: the adapted classifier's, or that of a
    `model.path` classifier no earlier stage replaces; None when the input carries none."""
    if (adapting := recipe.enabled("adapt")) is not None:
        return "the adapted classifier's head", list(tasks[adapting.source_task].labels)
    path = recipe.model.path
    if path is None or recipe.enabled("pretrain") is not None:  # pretraining hands on a language model
        return None
    labels = head_labels(path) if (Path(path) / "config.json").is_file() else None
    return None if labels is None else ("model.path's classifier head", labels)


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    settings = config.model_dump(mode="json", exclude={"seeds", "select_seed"})
    return stage_cache_key(NAME, settings, inputs, seed)


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    """Fine-tune `inputs.base` on `inputs.task` with seed `env.seed`; write `<work_dir>/finetune-<key>/final`
    (and reports).

    Under a launcher every rank calls this (evaluation runs on every rank, so ZeRO-3 can gather); rank 0
    alone logs, writes reports and the checkpoint. `env.deepspeed` runs the loop under ZeRO.
    """
    task, base, runtime, seed = inputs.task, inputs.base, env.runtime, env.seed
    kind = kinds.get(task.kind)
    key = cache_key(config, inputs, seed)
    stage_dir = env.stage_dir(NAME, key)
    labels = list(task.labels)

    model, tokenizer = load_task_model(base, task.kind, labels, seed=seed, dropout=config.dropout,
                                       trust_remote_code=env.trust_remote_code)
    device = runtime.device()

    def encode(records: list[dict]) -> list[dict]:
        return kind.encode(records, tokenizer, labels=labels, max_length=config.max_length,
                           prompt_template=config.prompt_template)

    train_records = load_records(task.train)
    train_items = encode(train_records)
    val_items = encode(load_records(task.validation)) if task.validation else None
    test_items = encode(load_records(task.test)) if task.test else None
    objective = kind.objective(tokenizer.pad_token_id, labels,
                               balance_over=train_items if config.class_weights == "balanced" else None)

    pretrained_names = checkpoint_parameter_names(model, base.uri)
    carried = {name for name in pretrained_names if is_head(name)}
    same_task = bool(carried) and head_labels(base.uri) == labels
    if carried and config.carried_head == "keep" and not same_task:
        raise ValueError(f"stages.finetune.carried_head: keep, but the input's head predicts "
                         f"{head_labels(base.uri)}, not this task's {labels}; set carried_head: reinitialise")
    metrics: dict[str, float] = {}
    if same_task and test_items:
        # The input already is a classifier of this task (an adapted one): its test scores are where
        # fine-tuning starts from, the "before" of what this stage adds.
        scores, _ = score(model.to(device), kind, objective, test_items, labels, device=device)
        metrics |= {f"input_test_{k}": v for k, v in scores.items()}
    if carried and config.carried_head == "reinitialise":
        reinitialise_head(model, seed)
    pretrained_names -= carried  # a head is the task's own, whatever the checkpoint held
    if config.reinit_pooler and not (carried and config.carried_head == "keep"):
        pretrained_names -= reinitialise_pooler(model, seed)

    steps_per_epoch = max(1, len(train_items) // (config.batch_size * config.grad_accum_steps))
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    new_parameters = frozenset(n for n, _ in model.named_parameters() if n not in pretrained_names)
    strategy = apply_strategy(model, config.strategy, StrategySettings(
        kind=kind, peft=config.peft, adapter_reduction=config.adapter_reduction, unfreeze_every=config.unfreeze_every,
        total_steps=max_steps, new_parameters=new_parameters), seed=seed)
    model = strategy.model
    model.to(device)
    fisher_text = None
    if config.regularizer is not None and config.regularizer.type == "ewc":  # a corpus, or the task's own text
        fisher_text = inputs.fisher or [kind.text(r) for r in train_records]
    regularizer = _regularizer(config, model, pretrained_names, base, fisher_text, env.token_store, env.datasets_dir,
                               device, seed)

    if config.layerwise_lr_decay:
        groups = layerwise_lr_groups(model, config.lr, config.layerwise_lr_decay, config.head_lr, config.weight_decay)
    else:
        # Newly initialised weights (the head) may learn faster than the pretrained body.
        named = list(model.named_parameters())
        groups = param_groups([p for n, p in named if n not in new_parameters], config.lr, config.weight_decay,
                              name="body")
        groups += param_groups([p for n, p in named if n in new_parameters], config.head_lr or config.lr,
                               config.weight_decay, name="head")
    optimizer = adamw(groups, lr=config.lr)
    engine = make_engine(model, optimizer, runtime, config, micro_batch_size=config.batch_size,
                         deepspeed=env.deepspeed)

    sampler = BatchSampler(
        train_items, config.batch_size, seed,
        lengths=[len(item["input_ids"]) for item in train_items] if config.group_by_length else None,
        weights=kind.sample_weights(train_items) if config.sampler == "balanced" else None,
    )
    metric, mode = selection(config, task.kind)
    early = None
    if config.early_stopping is not None:
        es = config.early_stopping
        early = EarlyStopping(f"val_{es.metric}", mode=es.mode, patience=es.patience, restore_best=es.restore_best)
    env.metrics(0, {"trainable_fraction": trainable_fraction(model), "train_examples": len(train_items),
                    "max_steps": max_steps})

    def validate() -> dict[str, float]:
        scores, _ = score(model, kind, objective, val_items, labels, device=device)
        return {f"val_{k}": v for k, v in scores.items()}

    settings = loop_settings(config, max_steps=max_steps, steps_per_epoch=steps_per_epoch, seed=seed,
                             evaluates=bool(val_items), progress=env.progress, description=f"{NAME} seed {seed}")
    result = train(model, objective, sampler, optimizer, settings, device=device, step_hooks=strategy.step_hooks,
                   post_step_hooks=strategy.post_step_hooks, regularizer=regularizer,
                   evaluate=validate if val_items else None, early_stopping=early, log_metrics=env.metrics,
                   runtime=runtime, engine=engine)

    # Validation scores of the weights kept (the best ones when early stopping restored them).
    metrics |= {"steps": float(result.steps), **result.eval_metrics}
    reports_dir = stage_dir / "reports"
    reports: list[str] = []
    if test_items:
        scores, report = score(model, kind, objective, test_items, labels, device=device, with_report=True)
        metrics |= {f"test_{k}": v for k, v in scores.items()}
    if test_items and runtime.is_main:
        reports_dir.mkdir(parents=True, exist_ok=True)
        report_path = reports_dir / "test_report.json"
        report_path.write_text(json.dumps(report, indent=2, default=_plain))
        reports.append(str(report_path))
        reports += [str(path) for path in kind.report_files(report, labels, reports_dir)]
    env.metrics(result.steps, {k: v for k, v in metrics.items() if k.startswith("test_")})

    lineage = stage_lineage(
        NAME, config=config.model_dump(mode="json") | {"seed": seed, "kind": task.kind, "labels": labels},
        cache_key=key, inputs=inputs, mlflow_run_id=env.mlflow_run_id, build_run_id=env.build_run_id,
    ) | {"strategy": config.strategy, "metrics": metrics}
    final = stage_dir / "final"
    checkpoint = CheckpointRef(uri=str(final), digest="", stage=NAME, mlflow_run_id=env.mlflow_run_id)
    with engine.full_parameters():  # ZeRO-3: whole weights, so the adapter and merged model are complete
        if runtime.is_main:
            digest = _save_final(model, tokenizer, stage_dir, lineage, is_peft=strategy.is_peft)
            checkpoint = dataclasses.replace(checkpoint, digest=digest)
    runtime.barrier()
    return Result(checkpoint=checkpoint, seed=seed, metrics=metrics, selection_metric=metric, selection_mode=mode,
                  reports=tuple(reports))


def contribution(config: Config, result: Result) -> Contribution | None:
    """The task's test score (its selection metric) of the output and, when the input already was a classifier of
    the task (an adapted one), of the input."""
    metric = result.selection_metric
    if f"test_{metric}" not in result.metrics:
        return None
    start = "input classifier" if f"input_test_{metric}" in result.metrics else "new head"
    return Contribution(f"{config.task} test {metric} ({start} → fine-tuned)", result.metrics.get(f"input_test_{metric}"),
                        result.metrics[f"test_{metric}"], higher_is_better=result.selection_mode == "max")


def aggregate_seeds(results: list[Result]) -> dict[str, float]:
    """`finetune.<metric>_mean` and `_std` (sample std; 0 for one seed) of every shared val/test metric."""
    scores = {r.seed: {k: v for k, v in r.metrics.items() if k.startswith(("val_", "test_"))} for r in results}
    return {f"finetune.{name}": value for name, value in aggregate(scores).items()}


def choose_seed(results: list[Result], select: str | int) -> Result:
    if select != "best":
        return next(r for r in results if r.seed == select)
    sign = 1 if results[0].selection_mode == "max" else -1
    return max(results, key=lambda r: sign * r.selection_value)


def _save_final(model, tokenizer, stage_dir: Path, lineage: dict, *, is_peft: bool) -> str:
    """Write `stage_dir/final` (a PEFT model merged, its adapter alone in `final/adapter`); return the digest."""
    final = stage_dir / "final"
    model.cpu()
    if is_peft:
        adapter_dir = stage_dir / "adapter"
        model.save_pretrained(adapter_dir)
        model = model.merge_and_unload()
        lineage["adapter_dir"] = str(adapter_dir)
    digest = save_checkpoint(model, tokenizer, final, lineage=lineage)
    if is_peft:
        # The adapter alone sits beside the merged model, inside the checkpoint directory.
        (final / "adapter").mkdir()
        for f in Path(stage_dir / "adapter").iterdir():
            f.replace(final / "adapter" / f.name)
        Path(stage_dir / "adapter").rmdir()
    return digest


def _regularizer(config, model, pretrained_names, base, fisher_text, store, datasets_dir, device, seed):
    reg = config.regularizer
    if reg is None:
        return None
    params = anchored_parameters(model, pretrained_names)
    if not any(p.requires_grad for p in params.values()):
        raise ConfigError(
            f"stages.finetune.regularizer: with strategy {config.strategy!r} no pretrained weight trains, "
            "so there is nothing to hold in place; use strategy full or gradual_unfreezing, or drop the regularizer"
        )
    importance = None
    if reg.type == "ewc":
        importance = _fisher_for(params, base, fisher_text, store, datasets_dir, device, seed, reg.fisher_batches)
    log.info("%s regulariser on %d pretrained tensors, strength %g", reg.type, len(params), reg.strength)
    return AnchorPenalty(params, reg.strength, importance)


def _fisher_for(params, base, text: DatasetRef | list[str], store, datasets_dir, device, seed, n_batches):
    """Diagonal Fisher of the starting checkpoint's own LM loss, mapped onto the task model's parameter names."""
    objective_name = infer_objective(base.uri)
    # The language model's own head: the chain's last trained one (an adapted classifier has none of its own).
    lm_model, lm_tokenizer = load_model(base, objective_name, seed=seed, head_from=lm_head_source(base))
    lm_model.to(device)
    objective = build_objective(objective_name, lm_tokenizer)
    config = lm_model.config
    block = min(FISHER_BLOCK, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                or FISHER_BLOCK)
    if isinstance(text, DatasetRef):
        packed = PackedBlocks(store.build(text, lm_tokenizer, objective_name), block,
                              isolate_documents=Packing().isolates(objective_name))
    else:
        packed = pack_texts(text, lm_tokenizer, objective_name, block, datasets_dir=datasets_dir, store=store,
                            name="fisher-text")
    blocks = packed.head(8 * n_batches)
    if len(blocks) == 0:
        raise DataError(f"EWC: the Fisher text (regularizer.fisher_corpus) is shorter than one {block}-token block")
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, min(len(blocks), 8 * n_batches), 8):
        batch = objective.collate(blocks[start : start + 8], g)
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    fisher = diagonal_fisher(lm_model, objective.loss, batches)
    ones = {n: torch.ones_like(p) for n, p in params.items()}
    return {n: fisher.get(base_name(n), ones[n]) for n in params}


def _plain(value):
    """JSON for numpy scalars in library reports (seqeval's supports are int64)."""
    return value.item() if hasattr(value, "item") else str(value)

