"""Single-label sequence classification (binary or multi-class; optional text pairs), scored with scikit-learn."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaptflow.objectives.padding import model_inputs, pad_batch


class SequenceClassification:
    """Cross-entropy over one label per example; with class weights, the normaliser is the weights' sum."""

    name = "classification"

    def __init__(self, pad_id: int, class_weights: torch.Tensor | None = None):
        self.pad_id = pad_id
        self.class_weights = class_weights

    def collate(self, items: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["labels"] = labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        # With class weights the loss is a weighted mean, so the normaliser is the weights' sum.
        batch["n_targets"] = len(items) if self.class_weights is None else float(self.class_weights[labels].sum())
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(model(**model_inputs(batch)).logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        return F.cross_entropy(logits, batch["labels"], weight=weight, reduction="sum")

    def predict(self, logits: torch.Tensor, batch: dict) -> tuple[list, list, torch.Tensor]:
        """(predicted ids, gold ids, class probabilities) for one batch."""
        probs = logits.float().softmax(-1)
        return probs.argmax(-1).tolist(), batch["labels"].tolist(), probs.cpu()


class Classification:
    name = "classification"
    primary_metric = "macro_f1"
    higher_is_better = True
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    pipeline_task = "text-classification"
    has_head = True
    single_label = True
    robustness = True
    file_format = "records"

    def columns(self, config) -> dict[str, str]:
        pair = {"text_pair": "text_pair_field"} if config.text_pair_field is not None else {}
        return {"text": "text_field", **pair, "label": "label_field"}

    def schema(self, config):
        import pyarrow as pa

        return pa.schema([(column, pa.string()) for column in self.columns(config)])

    def labels_of(self, record: dict) -> list[str]:
        return [record["label"]]

    def label_order(self, seen: set[str]) -> tuple[str, ...]:
        return tuple(sorted(seen))

    def unknown_labels(self, records: list[dict], labels: list[str]) -> set[str]:
        return {r["label"] for r in records} - set(labels)

    def text(self, record: dict) -> str:
        return " ".join(t for t in (record["text"], record.get("text_pair")) if t)

    def encode(self, records, tokenizer, *, labels, max_length, prompt_template=None) -> list[dict]:
        index = {label: i for i, label in enumerate(labels)}
        pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
        enc = tokenizer([r["text"] for r in records], pairs, truncation=True, max_length=max_length)
        items = []
        for i, record in enumerate(records):
            item = {"input_ids": enc["input_ids"][i], "label": index[record["label"]]}
            if "token_type_ids" in enc:
                item["token_type_ids"] = enc["token_type_ids"][i]
            items.append(item)
        return items

    def objective(self, pad_id: int, labels: list[str], *, balance_over: list[dict] | None = None):
        if balance_over is None:
            return SequenceClassification(pad_id)
        counts = Counter(item["label"] for item in balance_over)
        weights = torch.tensor([len(balance_over) / (len(labels) * max(1, counts[i])) for i in range(len(labels))])
        return SequenceClassification(pad_id, class_weights=weights)

    def sample_weights(self, items: list[dict]) -> torch.Tensor:
        counts = Counter(item["label"] for item in items)
        return torch.tensor([1.0 / counts[item["label"]] for item in items], dtype=torch.double)

    def metrics(self, loss, gold, predicted, probabilities, labels) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        ids = list(range(len(labels)))
        probs = torch.cat(probabilities).numpy()
        return {
            "accuracy": float(accuracy_score(gold, predicted)),
            "micro_f1": float(f1_score(gold, predicted, labels=ids, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(gold, predicted, labels=ids, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(gold, predicted, labels=ids, average="weighted", zero_division=0)),
            "loss": loss,
            "ece": expected_calibration_error(probs, gold),
        }

    def report(self, gold, predicted, labels, loss) -> dict:
        from sklearn.metrics import classification_report, confusion_matrix

        ids = list(range(len(labels)))
        return {
            "per_class": classification_report(gold, predicted, labels=ids, target_names=labels, output_dict=True,
                                               zero_division=0),
            "confusion_matrix": confusion_matrix(gold, predicted, labels=ids).tolist(),
            "labels": labels,
        }

    def report_files(self, report: dict, labels: list[str], directory: Path) -> list[Path]:
        return [plot_confusion_matrix(report["confusion_matrix"], labels, directory / "confusion_matrix.png")]


def expected_calibration_error(probs: np.ndarray, gold: list[int], bins: int = 15) -> float:
    """Mean |accuracy − confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(gold)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str | Path) -> Path:
    """Save a confusion-matrix heat map (rows: gold, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(matrix)
    size = max(4, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > data.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


CLASSIFICATION = Classification()
