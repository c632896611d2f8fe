"""Active learning: choose which examples of a labelled pool to fine-tune on, round by round.

    active_learning.run(Config(...), Inputs(base=..., task=TaskSplits, finetune=finetune.Config(...)), env) -> Result

The pool is the task's train split. Round 0 takes `initial` random examples; every round fine-tunes `base`
afresh on all examples selected so far (the fine-tuning stage itself, on a train split holding just those),
records that model's validation/test metrics (the learning curve), scores the unselected pool with it and adds
the next batch: the most uncertain (`entropy`, `margin`), the farthest in the model's embedding space from
everything selected (`kcenter`, Sener & Savarese 2018), or a random batch (`random`, the baseline to beat).
The pool's labels stand in for an annotator: a model only ever trains on the labels of selected examples.

`Result.train` is the selection written as a parquet train split, read by `labelled.load_records` and consumed
by the fine-tuning stage like any prepared split; `selected` says which pool row each example is, in which round
and by which score it came in. The same seed gives the same selection. Single-label tasks (classification) only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import model_validator

from adaptflow import kinds, storage
from adaptflow.config.base import PositiveInt, Reference, Section
from adaptflow.data.labelled import TaskSplits, load_records, record_id, write_records
from adaptflow.errors import ConfigError
from adaptflow.evaluation.scoring import EVAL_BATCH
from adaptflow.lineage import stage_cache_key
from adaptflow.models.checkpoints import ENCODER_TYPES, load_task_model
from adaptflow.objectives.padding import model_inputs, pad_batch
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.stages import finetune
from adaptflow.stages.contract import StageEnv

log = logging.getLogger(__name__)
NAME = "active_learning"  # its recipe section: stages.active_learning
DISTRIBUTED = False
REUSABLE = False
STRATEGIES = ("random", "entropy", "margin", "kcenter")


class Config(Section):
    """Active-learning selection of the training examples of `task` (its train split is the pool).

    Round 0 labels `initial` random examples; each of the `rounds` that follow fine-tunes on everything selected
    so far and adds a batch chosen by `strategy` with that model, until `budget` examples are selected. Batch
    sizes grow `linear`ly (equal batches) or `geometric`ally (e.g. 100 → 200 → 400 → 800). `pool_max` scores
    at most that many random unselected examples per round (speed); `evaluate_final` also fine-tunes on the
    whole budget, so the learning curve ends at `budget`.
    """

    enabled: bool = True
    task: Annotated[str, Reference("tasks", kind="classification",
                                   fine_tuned="active_learning makes that task's training split")]
    strategy: Literal["random", "entropy", "margin", "kcenter"] = "entropy"
    budget: PositiveInt = 800
    initial: PositiveInt = 100
    rounds: PositiveInt = 3
    growth: Literal["linear", "geometric"] = "linear"
    pool_max: PositiveInt | None = None
    evaluate_final: bool = True

    @model_validator(mode="after")
    def _budget_fits_rounds(self) -> Config:
        if self.budget < self.initial + self.rounds:
            raise ValueError(
                f"budget ({self.budget}) must be at least initial ({self.initial}) + rounds ({self.rounds}), so "
                "every round selects at least one example; raise budget, or lower initial or rounds"
            )
        sizes = self.sizes()
        largest = max(sizes[i + 1] - sizes[i] for i in range(self.rounds))
        if self.pool_max is not None and self.pool_max < largest:
            raise ValueError(
                f"pool_max ({self.pool_max}) must be at least the largest round's batch ({largest}), or that round "
                "could not find enough candidates; raise pool_max or remove it (score the whole pool)"
            )
        return self

    def sizes(self) -> list[int]:
        """Labelled examples after each round: `initial`, …, `budget` (strictly increasing, `rounds` + 1 values)."""
        extra = self.budget - self.initial
        sizes = [self.initial]
        for r in range(1, self.rounds + 1):
            if self.growth == "linear":
                raw = self.initial + round(extra * r / self.rounds)
            else:
                raw = round(self.initial * (self.budget / self.initial) ** (r / self.rounds))
            # Rounding must not leave a round empty nor leave later rounds without an example each.
            sizes.append(min(max(raw, sizes[-1] + 1), self.budget - (self.rounds - r)))
        return sizes


@dataclass(frozen=True)
class Inputs(Record):
    base: CheckpointRef  # every round fine-tunes this checkpoint afresh
    task: TaskSplits = field(metadata={"context": ""})  # its train split is the pool
    finetune: finetune.Config  # how each round fine-tunes (stages.finetune)


@dataclass(frozen=True)
class SelectedExample(Record):
    """One selected pool example: its row in the pool split, a content id, and how it was chosen."""

    index: int  # row of the pool (the task's train split, whose digest is SelectionResult.pool.digest)
    id: str  # 16 hex of the record's canonical JSON: the same example in any re-prepared pool
    round: int  # the round that added it (0: the random cold start)
    strategy: str
    score: float | None  # entropy, margin score or k-center distance when chosen; None when drawn at random


@dataclass(frozen=True)
class CurvePoint(Record):
    """The model fine-tuned on the first `labelled` selected examples, and its `val_*`/`test_*` metrics."""

    round: int
    labelled: int
    metrics: dict[str, float]
    checkpoint: CheckpointRef


@dataclass(frozen=True)
class Result(Record):
    """What a selection produced: the train split to fine-tune on, the learning curve, and each example's origin."""

    train: DatasetRef  # the selected examples, in pool order: the next fine-tuning stage's train split
    pool: DatasetRef
    strategy: str
    seed: int
    curve: tuple[CurvePoint, ...]
    selected: tuple[SelectedExample, ...]


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
    task = kinds.get(kind)
    if not task.single_label:
        raise ConfigError(
            f"active learning scores single-label class probabilities, but this task is {kind}; "
            "use a classification task (NER and SFT selection are not supported)"
        )
    model, tokenizer = load_task_model(checkpoint, kind, list(labels), trust_remote_code=trust_remote_code)
    model.to(device).eval()
    # Encoders classify from the first token ([CLS]); decoders from the last real one (padding is on the right).
    first_token = model.config.model_type in ENCODER_TYPES
    items = task.encode(records, tokenizer, labels=list(labels), max_length=max_length, prompt_template=None)
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


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    """hash(selection and fine-tuning settings, seed, base checkpoint, task splits, engine version)."""
    settings = {"select": config.model_dump(mode="json"),
                "finetune": inputs.finetune.model_dump(mode="json", exclude={"seeds", "select_seed"})}
    return stage_cache_key(NAME, settings, {"base": inputs.base, "task": inputs.task}, seed)


def run(config: Config, inputs: Inputs, env: StageEnv, *,
        finetune_round: Callable[[finetune.Config, finetune.Inputs, StageEnv], finetune.Result] = finetune.run
        ) -> Result:
    """Select `config.budget` examples of `inputs.task.train` in rounds; fine-tune each round with
    `inputs.finetune`, seed `env.seed`.

    Each round's model is `finetune_round(inputs.finetune, <the task with the selection so far as train>, env)` (its
    checkpoints land under `<work_dir>/active_learning-<key>/`, the selections under its `selected/`);
    `finetune_round` may be swapped for a caching wrapper with the same signature. Each round logs one point of
    the learning curve, `{round, labelled, val_*, test_*}` at step = labelled examples.

    Raises ``ConfigError`` before any training for a task that is not single-label or a pool smaller than the
    budget.
    """
    task, seed = inputs.task, env.seed
    where = f"stages.{NAME} (task {config.task!r})"
    if not kinds.get(task.kind).single_label:
        raise ConfigError(
            f"{where}: active learning ranks examples by class probabilities, so it needs a classification task, "
            f"not {task.kind}; point stages.{NAME}.task at a classification task or disable stages.{NAME}"
        )
    pool = load_records(task.train)
    sizes = config.sizes()
    if config.budget > len(pool):
        raise ConfigError(
            f"{where}: budget {config.budget} is more than the pool holds ({len(pool)} training examples); "
            f"set stages.{NAME}.budget to at most {len(pool)}"
        )
    stage_dir = env.stage_dir(NAME, cache_key(config, inputs, seed))
    rounds_env = StageEnv(work_dir=stage_dir, cache_dir=env.cache_dir, seed=seed,
                          trust_remote_code=env.trust_remote_code)
    name = (task.train.name or "task/train").split("/")[0]
    rng = np.random.default_rng(seed)
    device = env.runtime.device()

    cold_start = sorted(int(i) for i in rng.choice(len(pool), size=config.initial, replace=False))
    selected = [_selected(pool, i, 0, "random", None) for i in cold_start]
    curve: list[CurvePoint] = []
    for round_, size in enumerate(sizes):
        # In pool order: the same set of examples is the same file, whatever order it was selected in.
        train = write_subset([pool[i] for i in sorted(s.index for s in selected)], name=f"{name}-{config.strategy}",
                             out_dir=storage.join(stage_dir, "selected"))
        if round_ == config.rounds and not config.evaluate_final:
            break
        result = finetune_round(inputs.finetune, finetune.Inputs(base=inputs.base,
                                                                 task=dataclasses.replace(task, train=train)),
                                rounds_env)
        metrics = {k: v for k, v in result.metrics.items() if k.startswith(("val_", "test_"))}
        curve.append(CurvePoint(round=round_, labelled=size, metrics=metrics, checkpoint=result.checkpoint))
        env.metrics(size, {"round": float(round_), "labelled": float(size), **metrics})
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
                                       labels=task.labels, max_length=inputs.finetune.max_length,
                                       device=device, trust_remote_code=env.trust_remote_code)
        chosen, scores = select(
            config.strategy, batch, rng, labelled=labelled_rows, n=len(rows),
            probs=None if predictions is None else predictions.probs,
            embeddings=None if predictions is None else predictions.embeddings,
        )
        selected += [_selected(pool, rows[r], round_ + 1, config.strategy, score)
                     for r, score in zip(chosen, scores, strict=True)]

    return Result(train=train, pool=task.train, strategy=config.strategy, seed=seed, curve=tuple(curve),
                  selected=tuple(selected))


def _selected(pool: list[dict], index: int, round_: int, strategy: str, score: float | None) -> SelectedExample:
    return SelectedExample(index=index, id=record_id(pool[index]), round=round_, strategy=strategy, score=score)


def write_subset(records: list[dict], *, name: str, out_dir, split: str = "train") -> DatasetRef:
    """Write classification records as `<out_dir>/<name>-<digest>/<split>.parquet`, a split like a prepared one.

    Same columns and digest as `labelled.prepare_task` writes, so `load_records` reads and verifies it; a file
    already there (same content) is reused.
    """
    if not records:
        raise ValueError(f"write_subset({name!r}): no records to write; select at least one example")
    # Classification columns (text, optional text_pair, label) are all strings.
    schema = pa.schema([(column, pa.string()) for column in records[0]])
    return write_records(records, schema, name=name, split=split, out_dir=out_dir)
