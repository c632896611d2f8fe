"""Active learning: choose which examples of a labelled pool to fine-tune on, round by round.

    run_selection(config, finetune_config, task=TaskSplits, base=CheckpointRef, work_dir=..., seed=...)
        -> SelectionResult

The pool is the task's train split. Round 0 takes `initial` random examples; every round fine-tunes `base`
afresh on all examples selected so far (the stage's own `run_finetune`, on a train split holding just those),
records that model's validation/test metrics (the learning curve), scores the unselected pool with it and adds
the next batch: the most uncertain (`entropy`, `margin`), the farthest in the model's embedding space from
everything selected (`kcenter`, Sener & Savarese 2018), or a random batch (`random`, the baseline to beat).
The pool's labels stand in for an annotator: a model only ever trains on the labels of selected examples.

`SelectionResult.train` is the selection written as a parquet train split, read by `labelled.load_records`
and consumed by the fine-tuning stage like any prepared split; `selected` says which pool row each example
is, in which round and by which score it came in. The same seed gives the same selection. Classification only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from adaptflow import storage
from adaptflow.config import ActiveLearningConfig, FinetuneConfig
from adaptflow.distributed import SINGLE
from adaptflow.errors import ConfigError
from adaptflow.labelled import TaskSplits, load_records, record_id, write_records
from adaptflow.lineage import stage_cache_key
from adaptflow.models import ENCODER_TYPES, load_task_model
from adaptflow.objectives.padding import model_inputs, pad_batch
from adaptflow.refs import CheckpointRef, DatasetRef
from adaptflow.stages.finetune import EVAL_BATCH, FinetuneResult, run_finetune
from adaptflow.train import MetricsSink

log = logging.getLogger(__name__)
STAGE = "active_learning"  # its recipe section: stages.active_learning
STRATEGIES = ("random", "entropy", "margin", "kcenter")


@dataclass(frozen=True)
class SelectedExample:
    """One selected pool example: its row in the pool split, a content id, and how it was chosen."""

    index: int  # row of the pool (the task's train split, whose digest is SelectionResult.pool.digest)
    id: str  # 16 hex of the record's canonical JSON: the same example in any re-prepared pool
    round: int  # the round that added it (0: the random cold start)
    strategy: str
    score: float | None  # entropy, margin score or k-center distance when chosen; None when drawn at random


@dataclass(frozen=True)
class CurvePoint:
    """The model fine-tuned on the first `labelled` selected examples, and its `val_*`/`test_*` metrics."""

    round: int
    labelled: int
    metrics: dict[str, float]
    checkpoint: CheckpointRef


@dataclass(frozen=True)
class SelectionResult:
    """What a selection produced: the train split to fine-tune on, the learning curve, and each example's origin."""

    train: DatasetRef  # the selected examples, in pool order: the next fine-tuning stage's train split
    pool: DatasetRef
    strategy: str
    seed: int
    curve: tuple[CurvePoint, ...]
    selected: tuple[SelectedExample, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SelectionResult:
        """Back from `to_dict` (a cached or launched stage's JSON result)."""
        curve = tuple(CurvePoint(**p | {"checkpoint": CheckpointRef(**p["checkpoint"])}) for p in data["curve"])
        return cls(train=DatasetRef(**data["train"]), pool=DatasetRef(**data["pool"]), strategy=data["strategy"],
                   seed=data["seed"], curve=curve, selected=tuple(SelectedExample(**s) for s in data["selected"]))


@dataclass(frozen=True)
class PoolPredictions:
    probs: np.ndarray  # (n, classes) softmax probabilities
    embeddings: np.ndarray  # (n, hidden) last-layer state of the token the classifier pools ([CLS] for encoders)


def entropy_scores(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy (nats) of each row of class probabilities: higher means more uncertain."""
    probs = np.asarray(probs, dtype=np.float64)
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)


def margin_scores(probs: np.ndarray) -> np.ndarray:
    """1 − (top-1 − top-2 probability) of each row: higher means the two likeliest classes are closer."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"margin needs probabilities over at least 2 classes, got shape {probs.shape}")
    top2 = np.sort(probs, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def kcenter_greedy(embeddings: np.ndarray, selected_idx: Sequence[int], k: int) -> tuple[list[int], list[float]]:
    """Greedy k-center: `k` new rows, each the farthest (Euclidean) from every row selected so far.

    `selected_idx` are rows already labelled (the initial centres; never returned). Returns the new rows in
    pick order and each one's distance to its nearest centre when picked. With no centres yet, the first pick
    is the row nearest the mean (its score: that distance). Ties go to the lowest row.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    k = min(k, len(x) - len(set(selected_idx)))
    picked: list[int] = []
    scores: list[float] = []
    if len(selected_idx):
        nearest = np.full(len(x), np.inf)
        for centre in selected_idx:  # one centre at a time: memory stays O(n), not O(n × centres)
            nearest = np.minimum(nearest, np.linalg.norm(x - x[centre], axis=1))
    elif k > 0:
        to_mean = np.linalg.norm(x - x.mean(axis=0), axis=1)
        first = int(np.argmin(to_mean))
        picked, scores = [first], [float(to_mean[first])]
        nearest = np.linalg.norm(x - x[first], axis=1)
    taken = np.zeros(len(x), dtype=bool)
    taken[list(selected_idx) + picked] = True
    while len(picked) < k:
        gap = np.where(taken, -np.inf, nearest)
        row = int(np.argmax(gap))
        picked.append(row)
        scores.append(float(gap[row]))
        taken[row] = True
        nearest = np.minimum(nearest, np.linalg.norm(x - x[row], axis=1))
    return picked, scores


def select(
    strategy: str,
    k: int,
    rng: np.random.Generator,
    *,
    probs: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    labelled: Sequence[int] = (),
    n: int | None = None,
) -> tuple[list[int], list[float | None]]:
    """Choose up to `k` rows that are not in `labelled`; return them with their scores (None for random).

    Rows index `probs`/`embeddings` (whichever the strategy needs; `kcenter` uses the `labelled` rows as its
    starting centres, so give it their embeddings too); `n` counts the rows when neither is given (random).
    Uncertainty strategies take the top-`k` scores, ties to the lowest row; `random` draws from `rng`.
    """
    if n is None:
        given = probs if probs is not None else embeddings
        if given is None:
            raise ValueError(f"select({strategy!r}, ...) needs probs=, embeddings= or (for random) n=")
        n = len(given)
    taken = {int(i) for i in labelled}
    candidates = np.array([i for i in range(n) if i not in taken], dtype=np.int64)
    k = min(k, len(candidates))
    if strategy == "random":
        return [int(i) for i in rng.choice(candidates, size=k, replace=False)], [None] * k
    if strategy in ("entropy", "margin"):
        if probs is None:
            raise ValueError(f"select({strategy!r}, ...) needs the model's class probabilities (probs=)")
        scores = (entropy_scores if strategy == "entropy" else margin_scores)(probs)[candidates]
        order = np.lexsort((candidates, -scores))[:k]  # highest score first, then lowest row
        return [int(candidates[i]) for i in order], [float(scores[i]) for i in order]
    if strategy == "kcenter":
        if embeddings is None:
            raise ValueError("select('kcenter', ...) needs the model's embeddings (embeddings=)")
        return kcenter_greedy(embeddings, sorted(taken), k)
    raise ValueError(f"unknown selection strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


@torch.no_grad()
def predict_pool(
    checkpoint: CheckpointRef | str,
    records: list[dict],
    *,
    kind: str,
    labels: Sequence[str],
    max_length: int,
    batch_size: int = EVAL_BATCH,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
) -> PoolPredictions:
    """Class probabilities and pooled embeddings of a classifier for `records` (``text``, optional ``text_pair``).

    Tokenised as the fine-tuning stage does (truncated to `max_length`, dynamically padded), in batches of
    similar length so little is padded; rows come back in the order of `records`.
    """
    if kind != "classification":
        raise ConfigError(
            f"active learning scores single-label class probabilities, but this task is {kind}; "
            "use a classification task (NER and SFT selection are not supported)"
        )
    model, tokenizer = load_task_model(checkpoint, kind, list(labels), trust_remote_code=trust_remote_code)
    model.to(device).eval()
    # Encoders classify from the first token ([CLS]); decoders from the last real one (padding is on the right).
    first_token = model.config.model_type in ENCODER_TYPES
    pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
    enc = tokenizer([r["text"] for r in records], pairs, truncation=True, max_length=max_length)
    items = [{"input_ids": ids} for ids in enc["input_ids"]]
    if "token_type_ids" in enc:
        for item, types in zip(items, enc["token_type_ids"], strict=True):
            item["token_type_ids"] = types
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    probs = np.zeros((len(items), len(labels)), dtype=np.float32)
    embeddings = np.zeros((len(items), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([items[i] for i in rows], tokenizer.pad_token_id).items()}
        out = model(**model_inputs(batch), output_hidden_states=True)
        hidden = out.hidden_states[-1]
        if first_token:
            pooled = hidden[:, 0]
        else:
            pooled = hidden[torch.arange(len(rows)), batch["attention_mask"].sum(1) - 1]
        probs[rows] = out.logits.float().softmax(-1).cpu().numpy()
        embeddings[rows] = pooled.float().cpu().numpy()
    return PoolPredictions(probs=probs, embeddings=embeddings)


def selection_cache_key(
    config: ActiveLearningConfig, finetune_config: FinetuneConfig, base: CheckpointRef, task: TaskSplits, seed: int
) -> str:
    """hash(selection and fine-tuning settings, seed, base checkpoint, task splits, engine version)."""
    splits = [d for d in (task.train, task.validation, task.test) if d is not None]
    settings = {"select": config.model_dump(mode="json"), "seed": seed,
                "finetune": finetune_config.model_dump(mode="json", exclude={"seeds", "select_seed"})}
    return stage_cache_key(STAGE, settings, base.digest, splits)


def run_selection(
    config: ActiveLearningConfig,
    finetune_config: FinetuneConfig,
    *,
    task: TaskSplits,
    base: CheckpointRef,
    work_dir: str | Path,
    seed: int = 0,
    log_metrics: MetricsSink | None = None,
    finetune: Callable[..., FinetuneResult] = run_finetune,
    trust_remote_code: bool = False,
) -> SelectionResult:
    """Select `config.budget` examples of `task.train` in rounds; fine-tune each round with `finetune_config`.

    Each round's model is `finetune(finetune_config, task=<task with the selection so far as train>, base=base,
    work_dir=work_dir, seed=seed)` (its checkpoints land under `work_dir`, the selections under
    `work_dir/selected`); `finetune` may be swapped for a caching wrapper with the same signature.
    `log_metrics(labelled, {round, labelled, val_*, test_*})` gets one point of the learning curve per round.

    Raises ``ConfigError`` before any training for a task that is not classification or a pool smaller
    than the budget.
    """
    log_metrics = log_metrics or (lambda step, metrics: None)
    where = f"stages.{STAGE} (task {config.task!r})"
    if task.kind != "classification":
        raise ConfigError(
            f"{where}: active learning ranks examples by class probabilities, so it needs a classification task, "
            f"not {task.kind}; point stages.{STAGE}.task at a classification task or disable stages.{STAGE}"
        )
    pool = load_records(task.train)
    sizes = config.sizes()
    if config.budget > len(pool):
        raise ConfigError(
            f"{where}: budget {config.budget} is more than the pool holds ({len(pool)} training examples); "
            f"set stages.{STAGE}.budget to at most {len(pool)}"
        )
    name = (task.train.name or "task/train").split("/")[0]
    rng = np.random.default_rng(seed)
    device = SINGLE.device()

    cold_start = sorted(int(i) for i in rng.choice(len(pool), size=config.initial, replace=False))
    selected = [_selected(pool, i, 0, "random", None) for i in cold_start]
    curve: list[CurvePoint] = []
    for round_, size in enumerate(sizes):
        # In pool order: the same set of examples is the same file, whatever order it was selected in.
        train = write_subset([pool[i] for i in sorted(s.index for s in selected)], name=f"{name}-{config.strategy}",
                             out_dir=storage.join(work_dir, "selected"))
        if round_ == config.rounds and not config.evaluate_final:
            break
        result = finetune(finetune_config, task=dataclasses.replace(task, train=train), base=base,
                          work_dir=work_dir, seed=seed)
        metrics = {k: v for k, v in result.metrics.items() if k.startswith(("val_", "test_"))}
        curve.append(CurvePoint(round=round_, labelled=size, metrics=metrics, checkpoint=result.checkpoint))
        log_metrics(size, {"round": float(round_), "labelled": float(size), **metrics})
        log.info("%s round %d: %d labelled, %s", where, round_, size,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("macro_f1")))
        if round_ == config.rounds:
            break

        batch = sizes[round_ + 1] - size
        taken = {s.index for s in selected}
        unlabelled = np.array([i for i in range(len(pool)) if i not in taken], dtype=np.int64)
        if config.pool_max is not None and config.pool_max < len(unlabelled):
            unlabelled = np.sort(rng.choice(unlabelled, size=config.pool_max, replace=False))
        # k-center measures distances to the selected examples, so they are embedded along with the candidates.
        rows = [s.index for s in selected] if config.strategy == "kcenter" else []
        rows += unlabelled.tolist()
        labelled_rows = range(len(rows) - len(unlabelled))
        predictions = None
        if config.strategy != "random":
            predictions = predict_pool(result.checkpoint, [pool[i] for i in rows], kind=task.kind,
                                       labels=task.labels, max_length=finetune_config.max_length,
                                       device=device, trust_remote_code=trust_remote_code)
        chosen, scores = select(
            config.strategy, batch, rng, labelled=labelled_rows, n=len(rows),
            probs=None if predictions is None else predictions.probs,
            embeddings=None if predictions is None else predictions.embeddings,
        )
        selected += [_selected(pool, rows[r], round_ + 1, config.strategy, score)
                     for r, score in zip(chosen, scores, strict=True)]

    return SelectionResult(train=train, pool=task.train, strategy=config.strategy, seed=seed, curve=tuple(curve),
                           selected=tuple(selected))


def _selected(pool: list[dict], index: int, round_: int, strategy: str, score: float | None) -> SelectedExample:
    return SelectedExample(index=index, id=record_id(pool[index]), round=round_, strategy=strategy, score=score)


def write_subset(records: list[dict], *, name: str, out_dir: str | Path, split: str = "train") -> DatasetRef:
    """Write classification records as `<out_dir>/<name>-<digest>/<split>.parquet`, a split like a prepared one.

    Same columns and digest as `labelled.prepare_task` writes, so `load_records` reads and verifies it; a file
    already there (same content) is reused.
    """
    if not records:
        raise ValueError(f"write_subset({name!r}): no records to write; select at least one example")
    # Classification columns (text, optional text_pair, label) are all strings.
    schema = pa.schema([(column, pa.string()) for column in records[0]])
    return write_records(records, schema, name=name, split=split, out_dir=out_dir)
