"""Task metrics through kept libraries: scikit-learn for classification, seqeval for entity-level NER."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def classification_metrics(gold: list[int], predicted: list[int], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    ids = list(range(len(labels)))
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "micro_f1": float(f1_score(gold, predicted, labels=ids, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(gold, predicted, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, predicted, labels=ids, average="weighted", zero_division=0)),
    }


def classification_report(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    from sklearn.metrics import classification_report as report
    from sklearn.metrics import confusion_matrix

    ids = list(range(len(labels)))
    return {
        "per_class": report(gold, predicted, labels=ids, target_names=labels, output_dict=True, zero_division=0),
        "confusion_matrix": confusion_matrix(gold, predicted, labels=ids).tolist(),
        "labels": labels,
    }


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


def ner_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    strict = {"mode": "strict", "scheme": IOB2}
    return {
        "entity_f1": float(f1_score(gold, predicted, zero_division=0, **strict)),
        "micro_f1": float(f1_score(gold, predicted, average="micro", zero_division=0, **strict)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0, **strict)),
        "precision": float(precision_score(gold, predicted, zero_division=0, **strict)),
        "recall": float(recall_score(gold, predicted, zero_division=0, **strict)),
        "token_accuracy": float(accuracy_score(gold, predicted)),
    }


def ner_report(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    from seqeval.metrics import classification_report as report
    from seqeval.scheme import IOB2

    return {"per_entity": report(gold, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)}


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
