"""Adversarial domain adaptation: the reversal layer, the λ schedule, alignment on shifted toy domains,
and the negative-transfer guard."""

from __future__ import annotations

import json
import random

import pytest
import torch

from adaptflow.config import AdaptConfig, ModelConfig, TaskDataConfig, TinyModelConfig
from adaptflow.data import prepare_corpus
from adaptflow.labelled import prepare_task
from adaptflow.models import materialize_base_model
from adaptflow.objectives.dann import adversarial_weight, grad_reverse
from adaptflow.stages.adapt import guard_decision, run_adapt

POSITIVE, NEGATIVE = ["good", "great", "excellent", "love"], ["bad", "awful", "poor", "hate"]
BOOKS = ["novel", "author", "chapter", "plot", "story", "reader", "page", "prose"]
KITCHEN = ["pan", "knife", "blender", "kettle", "pot", "stove", "lid", "handle"]


def review(topic: list[str], rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = rng.choices(topic, k=8) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words), label


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Toy sentiment in two topics: same labelling rule, disjoint topic words (a pure covariate shift)."""
    tmp = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    books = [review(BOOKS, rng) for _ in range(400)]
    kitchen = [review(KITCHEN, rng) for _ in range(400)]
    source = prepare_task("books", TaskDataConfig(
        type="classification", validation_fraction=0.2,
        train=write_jsonl(tmp / "books.jsonl", [{"text": t, "label": y} for t, y in books])), out_dir=tmp / "d")
    target_labelled = prepare_task("kitchen_labelled", TaskDataConfig(
        type="classification", validation_fraction=0.5,
        train=write_jsonl(tmp / "kitchen.jsonl", [{"text": t, "label": y} for t, y in kitchen[:200]])),
        out_dir=tmp / "d")
    corpus_path = tmp / "kitchen.txt"
    corpus_path.write_text("\n".join(t for t, _ in kitchen[200:]))
    target = prepare_corpus(str(corpus_path), name="kitchen", out_dir=tmp / "d", validation_fraction=0.3)
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=64, vocab_size=100)
    texts = [t for t, _ in books + kitchen]
    base = materialize_base_model(ModelConfig(tiny=tiny), out_dir=tmp / "models", tokenizer_texts=texts, seed=0)
    return {"source": source, "target": target, "target_labelled": target_labelled, "base": base}


def config(**settings) -> AdaptConfig:
    return AdaptConfig(**{"source_task": "books", "target_corpus": "kitchen", "target_task": "kitchen_labelled",
                          "max_steps": 60, "batch_size": 16, "lr": 3e-3, "head_lr": 3e-3, "max_length": 32,
                          "eval_every": 60, "log_every": 10, "schedule": "constant", **settings})


def test_reversal_gradient_is_minus_lambda_times_identity():
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    (grad_reverse(x, 0.7) * upstream).sum().backward()
    reversed_grad = x.grad.clone()
    x.grad = None
    (x * upstream).sum().backward()
    assert torch.equal(grad_reverse(x, 0.7), x)
    torch.testing.assert_close(reversed_grad, -0.7 * x.grad, rtol=0, atol=0)


def test_lambda_schedules():
    assert adversarial_weight("ganin", 0.0) == 0.0
    assert adversarial_weight("ganin", 0.5) == pytest.approx(2 / (1 + torch.e ** -5) - 1)
    assert adversarial_weight("ganin", 1.0) == pytest.approx(0.9999092, abs=1e-6)
    assert adversarial_weight("ganin", 1.0, gamma=1.0, maximum=0.5) == pytest.approx(0.5 * 0.4621172, abs=1e-6)
    assert adversarial_weight("constant", 0.0, maximum=0.3) == 0.3
    assert adversarial_weight("warm_start", 0.05, warm_start=0.1) == 0.0
    assert adversarial_weight("warm_start", 0.1, warm_start=0.1) == 0.0
    assert adversarial_weight("warm_start", 1.0, warm_start=0.1) == pytest.approx(0.9999092, abs=1e-6)


def test_guard_decision_prefers_the_target_proxy():
    assert guard_decision({"target_accuracy": 0.8}, {"target_accuracy": 0.7}, tolerance=0.01)[0]
    assert not guard_decision({"target_accuracy": 0.6}, {"target_accuracy": 0.7}, tolerance=0.01)[0]
    unlabelled = {"source_accuracy": 0.90, "target_information_max": 0.5}
    assert guard_decision(unlabelled, {"source_accuracy": 0.905, "target_information_max": 0.4}, tolerance=0.01)[0]
    assert not guard_decision(unlabelled, {"source_accuracy": 0.95, "target_information_max": 0.4},
                              tolerance=0.01)[0]


def test_guard_rejects_a_stage_made_worse_on_purpose(domains, tmp_path):
    # λ = 1000 at the encoder's rate: the reversed gradient swamps the task, the target suffers.
    result = run_adapt(config(lambda_max=1000.0, lr=1e-2), source=domains["source"],
                       target=domains["target"].train, target_heldout=domains["target"].validation,
                       target_labelled=domains["target_labelled"], base=domains["base"], work_dir=tmp_path)
    assert not result.accepted, result.reason
    assert result.checkpoint == domains["base"]
    assert result.metrics["target_accuracy"] < result.metrics["reference_target_accuracy"]
    assert (tmp_path / result.adapted.uri).exists()
