"""Task fine-tuning: sequence classification, NER or instruction SFT, with one strategy per recipe.

    run_finetune(config, task=TaskSplits, base=CheckpointRef, seed=..., work_dir=...) -> FinetuneResult

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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptflow.config import FinetuneConfig
from adaptflow.data import load_texts
from adaptflow.distributed import SINGLE, DeepSpeedEngine, Runtime, TorchEngine
from adaptflow.errors import ConfigError, DataError
from adaptflow.labelled import TaskSplits, load_records
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.metrics import (
    classification_metrics,
    classification_report,
    expected_calibration_error,
    ner_metrics,
    ner_report,
    plot_confusion_matrix,
)
from adaptflow.models import checkpoint_parameter_names, load_model, load_task_model, save_checkpoint
from adaptflow.objectives import build_objective
from adaptflow.objectives.classification import SequenceClassification
from adaptflow.objectives.sft import InstructionSFT, encode_sft
from adaptflow.objectives.token_classification import TokenClassification, align_labels
from adaptflow.peft import apply_strategy, layerwise_lr_groups, param_groups, trainable_fraction
from adaptflow.refs import CheckpointRef, DatasetRef
from adaptflow.regularizers import AnchorPenalty, anchored_parameters, diagonal_fisher
from adaptflow.tokenize import pack_blocks, tokenize_corpus
from adaptflow.train import BatchSampler, EarlyStopping, LoopSettings, MetricsSink, adamw, train

log = logging.getLogger(__name__)
STAGE = "finetune"
EVAL_BATCH = 64


@dataclass(frozen=True)
class FinetuneResult:
    """The checkpoint, its metrics (`val_*` of the kept weights, `test_*`) and report files to keep."""

    checkpoint: CheckpointRef
    seed: int
    metrics: dict[str, float]
    selection_metric: str
    selection_mode: str
    reports: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneResult:
        """Back from `dataclasses.asdict` (a launched stage's JSON result)."""
        return cls(**data | {"checkpoint": CheckpointRef(**data["checkpoint"]), "reports": tuple(data["reports"])})

    @property
    def selection_value(self) -> float:
        """The validation score seeds are chosen by (the worst possible one when there was no validation)."""
        worst = float("-inf") if self.selection_mode == "max" else float("inf")
        return self.metrics.get(f"val_{self.selection_metric}", worst)


def selection(config: FinetuneConfig, kind: str) -> tuple[str, str]:
    """The validation metric (and direction) that early stopping and seed selection use."""
    if config.early_stopping is not None:
        return config.early_stopping.metric, config.early_stopping.mode
    return ("loss", "min") if kind == "sft" else ("macro_f1", "max")


def finetune_cache_key(config: FinetuneConfig, base: CheckpointRef, task: TaskSplits, seed: int) -> str:
    splits = [d for d in (task.train, task.validation, task.test) if d is not None]
    settings = config.model_dump(mode="json", exclude={"seeds", "select_seed"}) | {"seed": seed}
    return stage_cache_key(STAGE, settings, base.digest, splits)


def run_finetune(
    config: FinetuneConfig,
    *,
    task: TaskSplits,
    base: CheckpointRef,
    work_dir: str | Path,
    seed: int = 0,
    fisher_data: DatasetRef | None = None,
    mlflow_run_id: str | None = None,
    build_run_id: str | None = None,
    log_metrics: MetricsSink | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    runtime: Runtime = SINGLE,
    deepspeed: str | dict | None = None,
) -> FinetuneResult:
    """Fine-tune `base` on `task` with one seed; write `work_dir/finetune-<key>/final` (and reports).

    Under a launcher every rank calls this (evaluation runs on every rank, so ZeRO-3 can gather); rank 0
    alone logs, writes reports and the checkpoint. `deepspeed` (a DeepSpeed JSON config) runs the loop under ZeRO.
    """
    log_metrics = (log_metrics if runtime.is_main else None) or (lambda step, metrics: None)
    kind = task.kind
    key = finetune_cache_key(config, base, task, seed)
    stage_dir = Path(work_dir) / f"{STAGE}-{key}"
    labels = list(task.labels)

    model, tokenizer = load_task_model(
        base, kind, labels, seed=seed, dropout=config.dropout, trust_remote_code=trust_remote_code
    )
    pretrained_names = checkpoint_parameter_names(model, base.uri)
    if config.reinit_pooler:
        pretrained_names -= _reinitialise_pooler(model, seed)
    train_records = load_records(task.train)
    train_items = encode(train_records, kind, tokenizer, config, labels)
    val_items = encode(load_records(task.validation), kind, tokenizer, config, labels) if task.validation else None
    test_items = encode(load_records(task.test), kind, tokenizer, config, labels) if task.test else None
    objective = _objective(kind, tokenizer, labels, config, train_items)

    steps_per_epoch = max(1, len(train_items) // (config.batch_size * config.grad_accum_steps))
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    new_parameters = {n for n, _ in model.named_parameters() if n not in pretrained_names}
    strategy = apply_strategy(
        model, config.strategy, kind=kind, peft_config=config.peft, adapter_reduction=config.adapter_reduction,
        unfreeze_every=config.unfreeze_every, total_steps=max_steps, new_parameters=new_parameters, seed=seed,
    )
    model = strategy.model
    device = runtime.device()
    model.to(device)
    fisher_texts = None
    if config.regularizer is not None and config.regularizer.type == "ewc":
        fisher_texts = load_texts(fisher_data) if fisher_data is not None else _texts_of(train_records, kind)
    regularizer = _regularizer(config, model, pretrained_names, base, fisher_texts, device, seed)

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
    if deepspeed is not None:
        engine = DeepSpeedEngine(model, optimizer, runtime, config=deepspeed, micro_batch_size=config.batch_size,
                                 grad_accum_steps=config.grad_accum_steps, max_grad_norm=config.max_grad_norm,
                                 bf16=config.bf16)
    else:
        engine = TorchEngine(model, optimizer, runtime, max_grad_norm=config.max_grad_norm)

    sampler = BatchSampler(
        train_items, config.batch_size, seed,
        lengths=[len(item["input_ids"]) for item in train_items] if config.group_by_length else None,
        weights=_balanced_weights(train_items) if config.sampler == "balanced" else None,
    )
    metric, mode = selection(config, kind)
    early = None
    if config.early_stopping is not None:
        es = config.early_stopping
        early = EarlyStopping(f"val_{es.metric}", mode=es.mode, patience=es.patience, restore_best=es.restore_best)
    log_metrics(0, {"trainable_fraction": trainable_fraction(model), "train_examples": len(train_items),
                    "max_steps": max_steps})

    def validate() -> dict[str, float]:
        scores, _ = score(model, objective, val_items, kind, labels, batch_size=EVAL_BATCH, device=device)
        return {f"val_{k}": v for k, v in scores.items()}

    result = train(
        model, objective, sampler, optimizer,
        LoopSettings(
            max_steps=max_steps, grad_accum_steps=config.grad_accum_steps, max_grad_norm=config.max_grad_norm,
            bf16=config.bf16, schedule=config.schedule, warmup_ratio=config.warmup_ratio,
            log_every=config.log_every, eval_every=(config.eval_every or steps_per_epoch) if val_items else 0,
            seed=seed, progress=progress, description=f"{STAGE} seed {seed}", eval_at_start=False,
        ),
        device=device,
        step_hooks=strategy.step_hooks,
        post_step_hooks=strategy.post_step_hooks,
        regularizer=regularizer,
        evaluate=validate if val_items else None,
        early_stopping=early,
        log_metrics=log_metrics,
        runtime=runtime,
        engine=engine,
    )

    # Validation scores of the weights kept (the best ones when early stopping restored them).
    metrics: dict[str, float] = {"steps": float(result.steps), **result.eval_metrics}
    reports_dir = stage_dir / "reports"
    reports: list[str] = []
    if test_items:
        scores, report = score(model, objective, test_items, kind, labels, batch_size=EVAL_BATCH,
                               device=device, with_report=True)
        metrics |= {f"test_{k}": v for k, v in scores.items()}
    if test_items and runtime.is_main:
        reports_dir.mkdir(parents=True, exist_ok=True)
        report_path = reports_dir / "test_report.json"
        report_path.write_text(json.dumps(report, indent=2, default=_plain))
        reports.append(str(report_path))
        if kind == "classification":
            reports.append(str(plot_confusion_matrix(report["confusion_matrix"], labels,
                                                     reports_dir / "confusion_matrix.png")))
    log_metrics(result.steps, {k: v for k, v in metrics.items() if k.startswith("test_")})

    lineage = stage_lineage(
        STAGE,
        config=config.model_dump(mode="json") | {"seed": seed, "kind": kind, "labels": labels},
        cache_key=key, input_checkpoint=base,
        datasets=[d for d in (task.train, task.validation, task.test) if d is not None],
        mlflow_run_id=mlflow_run_id, build_run_id=build_run_id,
    ) | {"strategy": config.strategy, "metrics": metrics}
    final = stage_dir / "final"
    checkpoint = CheckpointRef(uri=str(final), digest="", stage=STAGE, mlflow_run_id=mlflow_run_id)
    with engine.full_parameters():  # ZeRO-3: whole weights, so the adapter and merged model are complete
        if runtime.is_main:
            digest = _save_final(model, tokenizer, stage_dir, lineage, is_peft=strategy.is_peft)
            checkpoint = dataclasses.replace(checkpoint, digest=digest)
    runtime.barrier()
    return FinetuneResult(checkpoint=checkpoint, seed=seed, metrics=metrics, selection_metric=metric,
                          selection_mode=mode, reports=tuple(reports))


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


def aggregate_seeds(results: list[FinetuneResult]) -> dict[str, float]:
    """`finetune.<metric>_mean` and `_std` (sample std; 0 for one seed) of every shared val/test metric."""
    from adaptflow.evaluate import aggregate

    scores = {r.seed: {k: v for k, v in r.metrics.items() if k.startswith(("val_", "test_"))} for r in results}
    return {f"finetune.{name}": value for name, value in aggregate(scores).items()}


def choose_seed(results: list[FinetuneResult], select: str | int) -> FinetuneResult:
    if select != "best":
        return next(r for r in results if r.seed == select)
    sign = 1 if results[0].selection_mode == "max" else -1
    return max(results, key=lambda r: sign * r.selection_value)


def encode(records: list[dict], kind: str, tokenizer, config: FinetuneConfig, labels: list[str]) -> list[dict]:
    """Tokenise a split once, in batches, into model-ready items (truncated to max_length)."""
    if kind == "sft":
        return [encode_sft(tokenizer, r["prompt"], r["response"], template=config.prompt_template,
                           max_length=config.max_length) for r in records]
    index = {label: i for i, label in enumerate(labels)}
    if kind == "ner":
        enc = tokenizer([r["tokens"] for r in records], is_split_into_words=True, truncation=True,
                        max_length=config.max_length)
        items = []
        for i, record in enumerate(records):
            tags = [index[t] for t in record["tags"]]
            items.append({"input_ids": enc["input_ids"][i], "labels": align_labels(enc.word_ids(i), tags)})
        return items
    pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
    enc = tokenizer([r["text"] for r in records], pairs, truncation=True, max_length=config.max_length)
    items = []
    for i, record in enumerate(records):
        item = {"input_ids": enc["input_ids"][i], "label": index[record["label"]]}
        if "token_type_ids" in enc:
            item["token_type_ids"] = enc["token_type_ids"][i]
        items.append(item)
    return items


@torch.no_grad()
def score(model, objective, items, kind, labels, *, batch_size: int, device, with_report: bool = False):
    """Metrics (and optionally a report) of `model` on `items`: sklearn/seqeval scores, or LM loss for SFT.

    One forward pass per batch, batches of similar length (sorted), so evaluation pads almost nothing.
    """
    from adaptflow.objectives.padding import model_inputs

    model.eval()
    total, targets = 0.0, 0
    gold, predicted, probabilities = [], [], []
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = objective.collate([items[i] for i in order[start : start + batch_size]], None)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        total += float(objective.loss_from_logits(logits, batch))
        targets += batch["n_targets"]
        if kind != "sft":
            p, g, probs = objective.predict(logits, batch)
            predicted += p
            gold += g
            if probs is not None:
                probabilities.append(probs)
    model.train()
    loss = total / max(1, targets)
    if kind == "sft":
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}, {"loss": loss}
    if kind == "ner":
        scores = ner_metrics(gold, predicted) | {"loss": loss}
        return scores, (ner_report(gold, predicted) if with_report else None)
    probs = torch.cat(probabilities).numpy()
    scores = classification_metrics(gold, predicted, labels) | {
        "loss": loss, "ece": expected_calibration_error(probs, gold)}
    return scores, (classification_report(gold, predicted, labels) if with_report else None)


def eval_objective(kind: str, tokenizer, labels: list[str]):
    """The task's objective without training-only settings (class weights): for scoring a model."""
    pad = tokenizer.pad_token_id
    if kind == "sft":
        return InstructionSFT(pad)
    if kind == "ner":
        return TokenClassification(pad, labels)
    return SequenceClassification(pad)


def _objective(kind: str, tokenizer, labels: list[str], config: FinetuneConfig, train_items: list[dict]):
    if kind != "classification" or config.class_weights != "balanced":
        return eval_objective(kind, tokenizer, labels)
    counts = Counter(item["label"] for item in train_items)
    weights = torch.tensor([len(train_items) / (len(labels) * max(1, counts[i])) for i in range(len(labels))])
    return SequenceClassification(tokenizer.pad_token_id, class_weights=weights)


def _balanced_weights(items: list[dict]) -> torch.Tensor:
    if "label" not in items[0]:
        raise ConfigError("stages.finetune.sampler: balanced needs single-label examples (classification)")
    counts = Counter(item["label"] for item in items)
    return torch.tensor([1.0 / counts[item["label"]] for item in items], dtype=torch.double)


def _reinitialise_pooler(model, seed: int) -> set[str]:
    """Give a BERT-style pooler fresh weights, as part of the new task head; return its parameter names.

    A checkpoint's pooler is often stale (sentence-embedding models such as MiniLM never train it, and
    masked-LM pretraining drops it), and re-initialising it steadies fine-tuning (Zhang et al., 2021).
    """
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is None:
        return set()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pooler.apply(model._init_weights)
    prefix = f"{model.base_model_prefix}.pooler."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def _texts_of(records: list[dict], kind: str) -> list[str]:
    if kind == "ner":
        return [" ".join(r["tokens"]) for r in records]
    if kind == "sft":
        return [f"{r['prompt']} {r['response']}" for r in records]
    return [r["text"] for r in records]


def _regularizer(config, model, pretrained_names, base, fisher_texts, device, seed):
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
        importance = _fisher_for(params, base, fisher_texts, device, seed, reg.fisher_batches)
    log.info("%s regulariser on %d pretrained tensors, strength %g", reg.type, len(params), reg.strength)
    return AnchorPenalty(params, reg.strength, importance)


def _fisher_for(params, base, texts, device, seed, n_batches):
    """Diagonal Fisher of the starting checkpoint's own LM loss, mapped onto the task model's parameter names."""
    from adaptflow.models import infer_objective
    from adaptflow.regularizers import base_name

    objective_name = infer_objective(base.uri)
    lm_model, lm_tokenizer = load_model(base, objective_name, seed=seed)
    lm_model.to(device)
    objective = build_objective(objective_name, lm_tokenizer)
    blocks = pack_blocks(tokenize_corpus(texts, lm_tokenizer, objective=objective_name), 128)
    if len(blocks) == 0:
        raise DataError("EWC: the Fisher text (regularizer.fisher_corpus) is shorter than one 128-token block")
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
