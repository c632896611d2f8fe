"""Adversarial domain adaptation: the reversal layer, the λ schedule, alignment on shifted toy domains,
and the negative-transfer guard."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adaptflow.config import DistributedConfig, ModelConfig, TaskDataConfig, TinyModelConfig
from adaptflow.data.corpus import prepare_corpus
from adaptflow.data.labelled import prepare_task
from adaptflow.launch import launch_stage
from adaptflow.models import materialize_base_model
from adaptflow.objectives.dann import (
    DANNModel,
    DomainAdversarial,
    DomainDiscriminator,
    PairedSampler,
    adversarial_weight,
    grad_reverse,
)
from adaptflow.objectives.padding import pad_batch
from adaptflow.stages import StageEnv
from adaptflow.stages import adapt as stage
from adaptflow.stages.adapt import Config as AdaptConfig
from adaptflow.stages.adapt import guard_decision
from adaptflow.train import BatchSampler, LoopSettings, train
from tests.conftest import DOMAINS

POSITIVE, NEGATIVE = ["good", "great", "excellent", "love"], ["bad", "awful", "poor", "hate"]
BOOKS = {
    "topic": ["novel", "author", "chapter", "plot", "story", "reader", "page", "prose"],
    "positive": ["gripping", "moving"],
    "negative": ["boring", "dull"],
}
KITCHEN = {
    "topic": ["pan", "knife", "blender", "kettle", "pot", "stove", "lid", "handle"],
    "positive": ["sturdy", "sharp"],
    "negative": ["flimsy", "rusty"],
}


def review(domain: dict, rng: random.Random, *, shared: int, own: int) -> tuple[str, str]:
    """Six topic words, `shared` sentiment words common to both domains and `own` of the domain's own."""
    label = rng.choice(["positive", "negative"])
    words = (
        rng.choices(domain["topic"], k=6)
        + rng.choices(POSITIVE if label == "positive" else NEGATIVE, k=shared)
        + rng.choices(domain[label], k=own)
    )
    rng.shuffle(words)
    return " ".join(words), label


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def toy_domains(tmp, *, shared: int, own: int) -> dict:
    """Toy sentiment in two domains: disjoint topic words and partly domain-specific sentiment words."""
    rng = random.Random(0)
    books = [review(BOOKS, rng, shared=shared, own=own) for _ in range(400)]
    kitchen = [review(KITCHEN, rng, shared=shared, own=own) for _ in range(400)]
    source = prepare_task(
        "books",
        TaskDataConfig(
            type="classification",
            validation_fraction=0.2,
            train=write_jsonl(tmp / "books.jsonl", [{"text": t, "label": y} for t, y in books]),
        ),
        out_dir=tmp / "d",
    )
    target_labelled = prepare_task(
        "kitchen_labelled",
        TaskDataConfig(
            type="classification",
            validation_fraction=0.5,
            train=write_jsonl(tmp / "kitchen.jsonl", [{"text": t, "label": y} for t, y in kitchen[:200]]),
        ),
        out_dir=tmp / "d",
    )
    corpus_path = tmp / "kitchen.txt"
    corpus_path.write_text("\n".join(t for t, _ in kitchen[200:]))
    target = prepare_corpus(str(corpus_path), name="kitchen", out_dir=tmp / "d", validation_fraction=0.3)
    tiny = TinyModelConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64, vocab_size=100
    )
    texts = [t for t, _ in books + kitchen]
    base = materialize_base_model(ModelConfig(tiny=tiny), out_dir=tmp / "models", tokenizer_texts=texts, seed=0)
    return {"source": source, "target": target, "target_labelled": target_labelled, "base": base}


def inputs(domains: dict) -> stage.Inputs:
    return stage.Inputs(base=domains["base"], source=domains["source"], target=domains["target"].train,
                        target_heldout=domains["target"].validation, target_labelled=domains["target_labelled"])


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return toy_domains(tmp_path_factory.mktemp("toy"), shared=2, own=1)


def config(**settings) -> AdaptConfig:
    return AdaptConfig(
        **{
            "source_task": "books",
            "target_corpus": "kitchen",
            "target_task": "kitchen_labelled",
            "max_steps": 200,
            "batch_size": 16,
            "lr": 1e-3,
            "head_lr": 3e-3,
            "max_length": 32,
            "eval_every": 200,
            "log_every": 20,
            "lambda_schedule": "constant",
            "discriminator": {"hidden": [64], "lr": 1e-2},
            **settings,
        }
    )


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
    assert adversarial_weight("ganin", 0.5) == pytest.approx(2 / (1 + torch.e**-5) - 1)
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
    assert not guard_decision(unlabelled, {"source_accuracy": 0.95, "target_information_max": 0.4}, tolerance=0.01)[0]


class BagOfWords(nn.Module):
    """Mean word embedding → linear head: the bag-of-words setting of Ganin et al. A topic word's embedding
    keeps the domain in the features unless the adversary removes it; the task alone has no reason to."""

    def __init__(self, vocab: int, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.classifier = nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask, **_):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return SimpleNamespace(logits=self.classifier(pooled))


def test_adversary_makes_the_domains_harder_to_tell_apart_while_the_task_learns():
    rng = random.Random(0)
    words = sorted({w for d in (BOOKS, KITCHEN) for group in d.values() for w in group} | set(POSITIVE + NEGATIVE))
    ids = {w: i + 1 for i, w in enumerate(words)}  # 0 pads

    def examples(domain, n):
        out = []
        for _ in range(n):
            text, label = review(domain, rng, shared=2, own=1)
            out.append({"input_ids": [ids[w] for w in text.split()], "label": int(label == "positive")})
        return out

    source, target = examples(BOOKS, 300), examples(KITCHEN, 300)
    held_source, held_target = examples(BOOKS, 100), examples(KITCHEN, 100)

    def run(lambda_max: float, seed: int) -> tuple[float, float]:
        torch.manual_seed(seed)
        model = DANNModel(BagOfWords(len(ids) + 1), DomainDiscriminator(16, [32], dropout=0.0))
        objective = DomainAdversarial(pad_id=0)
        objective.weight = lambda_max
        sampler = PairedSampler(BatchSampler(source, 32, seed), BatchSampler(target, 32, seed + 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        train(
            model,
            objective,
            sampler,
            optimizer,
            LoopSettings(max_steps=1000, seed=seed, log_every=100),
            device=torch.device("cpu"),
        )
        model.eval()
        with torch.no_grad():
            logits, features = model(pad_batch(held_source + held_target, 0))
            domains = torch.tensor([0.0] * len(held_source) + [1.0] * len(held_target))
            discriminator = ((model.discriminator(features) > 0).float() == domains).float().mean().item()
            target_labels = torch.tensor([e["label"] for e in held_target])
            target_accuracy = (logits[len(held_source) :].argmax(-1) == target_labels).float().mean().item()
        return discriminator, target_accuracy

    seeds = [0, 1, 2]
    source_only = [run(0.0, seed) for seed in seeds]
    adversarial = [run(1.0, seed) for seed in seeds]
    # Without the adversary the spectator discriminator reads the domain off the topic words ...
    assert min(d for d, _ in source_only) > 0.9
    # ... with it, it barely can (the game oscillates, so single runs vary), and the task still transfers.
    assert sum(d for d, _ in adversarial) / len(seeds) < 0.7
    assert max(d for d, _ in adversarial) < 0.8
    assert min(a for _, a in adversarial) > 0.9


def test_guard_rejects_a_stage_made_worse_on_purpose(domains, tmp_path):
    # λ = 1000: the reversed gradient swamps the task loss and the target suffers.
    result = stage.run(config(lambda_max=1000.0), inputs(domains), StageEnv(work_dir=tmp_path))
    assert not result.accepted, result.reason
    assert result.checkpoint == domains["base"]
    assert result.metrics["target_accuracy"] < result.metrics["reference_target_accuracy"]
    assert (tmp_path / result.adapted.uri).exists()


def test_the_stage_runs_launched_on_two_ranks_under_zero3_and_saves_whole_weights(domains, tmp_path):
    """Both DANN and the guard's reference run train under ZeRO-3 on 2 ranks; rank 0 saves the LoRA-merged
    classifier gathered, so every tensor is whole and the adapted weights differ from the input's."""
    settings = config(max_steps=12, eval_every=12, strategy="lora", peft={"r": 4, "target_modules": ["query", "value"]})
    env = StageEnv(work_dir=tmp_path / "stages", seed=0, deepspeed=str(DOMAINS.parent / "infra/deepspeed/zero3.json"))
    launched = launch_stage(stage, settings, inputs(domains), env, job_dir=tmp_path / "job",
                            distributed=DistributedConfig(launcher="torchrun", nproc_per_node=2, omp_num_threads=1,
                                                          timeout_minutes=10))
    assert launched.world_size == 2
    result = launched.result
    assert {"target_accuracy", "reference_target_accuracy", "accepted"} <= set(result.metrics)
    adapted = load_file(f"{result.adapted.uri}/model.safetensors")
    base = load_file(f"{domains['base'].uri}/model.safetensors")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert adapted[query].shape == base[query].shape == (32, 32)
    assert not torch.equal(adapted[query], base[query])  # LoRA merged in: trained, whole
