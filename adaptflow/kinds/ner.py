"""Token classification (NER): one IOB2 tag per word, learned and predicted on each word's first sub-token, read
from CoNLL-style files and scored entity by entity with seqeval (strict IOB2)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from adaptflow.errors import ConfigError
from adaptflow.objectives.padding import IGNORE, model_inputs, pad_batch


def align_labels(word_ids: list[int | None], word_tags: list[int]) -> list[int]:
    """Sub-token labels from word labels: the first piece of each word gets the word's tag; every other piece
    and every special token get IGNORE, so each word counts once in the loss and in the metrics."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else word_tags[word])
        previous = word
    return labels


class TokenClassification:
    name = "ner"

    def __init__(self, pad_id: int, id2label: list[str]):
        self.pad_id = pad_id
        self.id2label = id2label

    def collate(self, items: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["n_targets"] = int((batch["labels"] != IGNORE).sum())
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(model(**model_inputs(batch)).logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")

    def predict(self, logits: torch.Tensor, batch: dict) -> tuple[list, list, None]:
        """Per example, the predicted and gold tag sequences over the labelled (first) sub-tokens."""
        predicted = logits.argmax(-1).cpu()
        gold = batch["labels"].cpu()
        preds, golds = [], []
        for p, g in zip(predicted, gold, strict=True):
            keep = g != IGNORE
            preds.append([self.id2label[i] for i in p[keep].tolist()])
            golds.append([self.id2label[i] for i in g[keep].tolist()])
        return preds, golds, None


class NamedEntities:
    name = "ner"
    primary_metric = "entity_f1"
    higher_is_better = True
    auto_model = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    pipeline_task = "token-classification"
    has_head = True
    single_label = False
    robustness = True
    file_format = "conll"

    def columns(self, config) -> dict[str, str]:
        return {}  # CoNLL columns are chosen by token_column / tag_column

    def schema(self, config):
        import pyarrow as pa

        return pa.schema([("tokens", pa.list_(pa.string())), ("tags", pa.list_(pa.string()))])

    def labels_of(self, record: dict) -> list[str]:
        return record["tags"]

    def label_order(self, seen: set[str]) -> tuple[str, ...]:
        return ("O", *sorted(seen - {"O"}))

    def unknown_labels(self, records: list[dict], labels: list[str]) -> set[str]:
        # By entity type: a model that knows B-Disease also reads I-Disease.
        return {t[2:] for r in records for t in r["tags"] if t != "O"} - {t[2:] for t in labels if t != "O"}

    def text(self, record: dict) -> str:
        return " ".join(record["tokens"])

    def encode(self, records, tokenizer, *, labels, max_length, prompt_template=None) -> list[dict]:
        index = {label: i for i, label in enumerate(labels)}
        enc = tokenizer([r["tokens"] for r in records], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        return [{"input_ids": enc["input_ids"][i],
                 "labels": align_labels(enc.word_ids(i), [index[tag] for tag in record["tags"]])}
                for i, record in enumerate(records)]

    def objective(self, pad_id: int, labels: list[str], *, balance_over: list[dict] | None = None):
        return TokenClassification(pad_id, labels)

    def sample_weights(self, items: list[dict]):
        raise ConfigError("stages.finetune.sampler: balanced needs single-label examples (classification)")

    def metrics(self, loss, gold, predicted, probabilities, labels) -> dict[str, float]:
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
            "loss": loss,
        }

    def report(self, gold, predicted, labels, loss) -> dict:
        from seqeval.metrics import classification_report
        from seqeval.scheme import IOB2

        return {"per_entity": classification_report(gold, predicted, mode="strict", scheme=IOB2, output_dict=True,
                                                    zero_division=0)}

    def report_files(self, report: dict, labels: list[str], directory: Path) -> list[Path]:
        return []


NER = NamedEntities()
