"""Task kinds: everything that differs between classification, NER and instruction SFT, one module per kind.

A kind knows its data (file format, columns, labels, the text of a record), its model side (the transformers
head, the PEFT task type, how records become model inputs, the objective) and its scoring (metrics, the primary
metric and its direction, report files). Stages, evaluation, active learning and PEFT wiring ask the kind —
`kinds.get(task.kind).encode(...)` — instead of branching on its name.

Adding a kind: write `kinds/<name>.py` with a class satisfying `TaskKind`, and add its instance to `KINDS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from adaptflow.kinds.classification import CLASSIFICATION
from adaptflow.kinds.ner import NER
from adaptflow.kinds.sft import SFT


class TaskKind(Protocol):
    name: str  # a recipe's `tasks.<name>.type`
    primary_metric: str  # gates, robustness drops, early stopping and seed selection read it by default
    higher_is_better: bool  # the primary metric's direction
    auto_model: str  # the transformers Auto class with this kind's head
    peft_task_type: str  # PEFT's TaskType for it
    pipeline_task: str  # the transformers pipeline a registered model of this kind serves
    has_head: bool  # a freshly initialised head, one output per label (sft reuses the LM head)
    single_label: bool  # one class per example (class weights, balanced sampling, active learning)
    robustness: bool  # scored under input noise by the evaluation
    file_format: str  # "records" (JSON Lines, CSV, parquet with named fields) or "conll" (token/tag columns)

    def columns(self, config) -> dict[str, str]:
        """Output column -> the `tasks.<name>` setting naming its field in a records file."""

    def schema(self, config) -> Any:
        """The pyarrow schema of a prepared split."""

    def labels_of(self, record: dict) -> list[str]:
        """The labels one record carries (none for sft)."""

    def label_order(self, seen: set[str]) -> tuple[str, ...]:
        """The label set in id order, when the recipe does not list it."""

    def unknown_labels(self, records: list[dict], labels: list[str]) -> set[str]:
        """Labels in `records` that a model trained on `labels` cannot predict."""

    def text(self, record: dict) -> str:
        """The words of a record, as a corpus document would hold them."""

    def encode(self, records: list[dict], tokenizer, *, labels: list[str], max_length: int,
               prompt_template: str) -> list[dict]:
        """Model-ready items (token ids, targets), truncated to `max_length`."""

    def objective(self, pad_id: int, labels: list[str], *, balance_over: list[dict] | None = None):
        """The training/evaluation objective (collate + loss [+ predict]); `balance_over` the training items to
        weight classes by inverse frequency (single-label kinds)."""

    def sample_weights(self, items: list[dict]):
        """Per-item sampling weights that balance the classes (single-label kinds; others refuse)."""

    def metrics(self, loss: float, gold: list, predicted: list, probabilities, labels: list[str]) -> dict[str, float]:
        """Metrics of one scored split; `gold`/`predicted` are empty for kinds that predict nothing but a loss."""

    def report(self, gold: list, predicted: list, labels: list[str], loss: float) -> dict:
        """A detailed report of one scored split (per class / per entity)."""

    def report_files(self, report: dict, labels: list[str], directory: Path) -> list[Path]:
        """Extra files worth keeping beside the report (e.g. a confusion-matrix plot)."""


KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (CLASSIFICATION, NER, SFT)}


def get(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}: use one of {', '.join(KINDS)}") from None


__all__ = ["KINDS", "TaskKind", "get"]
