"""Adversarial domain adaptation: the reversal layer, the λ schedule, alignment on shifted toy domains,
and the negative-transfer guard."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from adaptflow.config import DistributedConfig, ModelConfig, TaskDataConfig, TinyModelConfig
from adaptflow.data.corpus import prepare_corpus
from adaptflow.data.labelled import prepare_task
from adaptflow.launch import launch_stage
from adaptflow.models import materialize_base_model
from adaptflow.models.checkpoints import LM_HEAD_FILE, head_labels, lm_head_source, load_model
from adaptflow.objectives.adaptation import (
    AdaptationModel,
    DomainAdaptation,
    DomainDiscriminator,
    PairedSampler,
    adversarial_weight,
    grad_reverse,
)
from adaptflow.objectives.padding import pad_batch
from adaptflow.stages import StageEnv, finetune
from adaptflow.stages import adapt as stage
from adaptflow.stages.adapt import Config as AdaptConfig
from adaptflow.stages.adapt import guard_decision
from adaptflow.train import BatchSampler, LoopSettings, train
from adaptflow.train.loop import LoopResult
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
        model = AdaptationModel(BagOfWords(len(ids) + 1), DomainDiscriminator(16, [32], dropout=0.0))
        objective = DomainAdaptation(pad_id=0)
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
    assert result.checkpoint == result.reference != domains["base"], "a rejection hands on the source-only classifier"
    assert result.metrics["target_accuracy"] < result.metrics["reference_target_accuracy"]
    assert (tmp_path / result.adapted.uri).exists()
    # The classifier handed on is the one a source-only stage (same seed and budget, no guard) writes.
    alone = stage.run(config(lambda_max=1000.0).source_only().model_copy(update={"guard": stage.GuardConfig(enabled=False)}),
                      inputs(domains), StageEnv(work_dir=tmp_path / "alone"))
    assert alone.checkpoint.digest == result.checkpoint.digest
    AutoModelForSequenceClassification.from_pretrained(result.checkpoint.uri)  # a classifier, never the input LM


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


@pytest.fixture(scope="module")
def adapted_with_mlm(domains, tmp_path_factory):
    """A classifier adapted with a target masked LM (guard off: the adapted one goes on)."""
    settings = config(max_steps=20, eval_every=20, adversary="none", guard=stage.GuardConfig(enabled=False),
                      target_mlm=stage.TargetMLMConfig(weight=0.5))
    return stage.run(settings, inputs(domains), StageEnv(work_dir=tmp_path_factory.mktemp("mlm"), seed=0))


def test_the_adapted_classifier_carries_its_trained_mlm_head(adapted_with_mlm, domains, caplog):
    checkpoint = adapted_with_mlm.checkpoint
    assert checkpoint == adapted_with_mlm.adapted and adapted_with_mlm.reference is None
    saved = load_file(f"{checkpoint.uri}/{LM_HEAD_FILE}")
    assert "cls.predictions.transform.dense.weight" in saved
    assert lm_head_source(checkpoint) == Path(checkpoint.uri)
    assert lm_head_source(domains["base"]) == Path(domains["base"].uri)  # a tiny masked LM saves its own head
    assert head_labels(checkpoint.uri) == ["negative", "positive"] and head_labels(domains["base"].uri) is None
    with caplog.at_level(logging.INFO, logger="adaptflow.models.checkpoints"):
        lm, _ = load_model(checkpoint, "mlm", head_from=lm_head_source(checkpoint))
    assert "MLM head comes from" in caplog.text
    torch.testing.assert_close(lm.state_dict()["cls.predictions.transform.dense.weight"],
                               saved["cls.predictions.transform.dense.weight"])
    fresh, _ = load_model(checkpoint, "mlm")
    assert not torch.equal(fresh.state_dict()["cls.predictions.transform.dense.weight"],
                           saved["cls.predictions.transform.dense.weight"])


@pytest.mark.parametrize("carried_head", ["keep", "reinitialise"])
def test_fine_tuning_after_adaptation_treats_the_carried_head_as_new_whatever_it_keeps(adapted_with_mlm, domains,
                                                                                       tmp_path, monkeypatch,
                                                                                       carried_head, caplog):
    """The adapted encoder is the start; its task head is kept or drawn afresh as the recipe says, and either
    way it trains at head_lr and is never anchored by L2-SP/EWC. EWC's Fisher is the masked-LM loss through the
    head adaptation trained. Fine-tuning starts where adaptation ended: its input's test scores are recorded."""
    seen = {}

    def no_training(model, objective, sampler, optimizer, settings, **kwargs):  # the starting weights are saved
        seen.update(optimizer=optimizer, regularizer=kwargs["regularizer"])
        return LoopResult(steps=0, tokens=0, seconds=0.0)

    monkeypatch.setattr(finetune, "train", no_training)
    labelled = domains["target_labelled"]
    task = dataclasses.replace(labelled, test=labelled.validation)
    settings = finetune.Config(task="kitchen_labelled", max_steps=4, batch_size=16, lr=1e-4, head_lr=5e-3,
                               max_length=32, carried_head=carried_head,
                               regularizer={"type": "ewc", "strength": 1.0, "fisher_batches": 1})
    with caplog.at_level(logging.INFO, logger="adaptflow.models.checkpoints"):
        result = finetune.run(settings, finetune.Inputs(base=adapted_with_mlm.checkpoint, task=task),
                              StageEnv(work_dir=tmp_path, seed=3))
    assert f"MLM head comes from {adapted_with_mlm.checkpoint.uri}" in caplog.text  # EWC's Fisher
    head, start = load_file(f"{result.checkpoint.uri}/model.safetensors"), load_file(
        f"{adapted_with_mlm.checkpoint.uri}/model.safetensors")
    for name in ("classifier.weight", "bert.pooler.dense.weight"):  # a kept head keeps the pooler it reads
        assert torch.equal(head[name], start[name]) == (carried_head == "keep"), name
    assert torch.equal(head["bert.encoder.layer.0.attention.self.query.weight"],
                       start["bert.encoder.layer.0.attention.self.query.weight"])
    heads = [group for group in seen["optimizer"].param_groups if group["name"] == "head"]
    assert {group["lr"] for group in heads} == {5e-3}
    new = 2 if carried_head == "keep" else 4  # classifier weight and bias (and, drawn afresh, the pooler's)
    assert sum(len(group["params"]) for group in heads) == new, "the head, and nothing else, is new"
    assert not any(name.startswith("classifier") for name in seen["regularizer"].names)
    # The input's own test scores, taken before its head was touched: with nothing trained, a kept head's output
    # is the input model itself.
    if carried_head == "keep":
        assert result.metrics["test_accuracy"] == pytest.approx(result.metrics["input_test_accuracy"], abs=1e-9)
    contribution = finetune.contribution(settings, result)
    assert contribution.before == result.metrics["input_test_macro_f1"]  # the selection metric's
    assert contribution.measure == "kitchen_labelled test macro_f1 (input classifier → fine-tuned)"


@pytest.mark.parametrize("objectives, logged", [
    ({"adversary": "cdan"}, "train_discriminator_accuracy"),  # its discriminator reads hidden × classes inputs
    ({"adversary": "none", "moment_matching": "mmd"}, "train_moment_distance"),
    ({"adversary": "none", "moment_matching": "coral"}, "train_moment_distance"),
    ({"adversary": "none", "reweight_source": "target_prior"}, "source_weight.positive"),
    ({"adversary": "none", "self_training": {"rounds": [0.5], "threshold": None}}, "pseudo_labelled_fraction"),
    ({"adversary": "none", "strategy": "lora", "target_mlm": {"head_warmup_steps": 2}}, "train_target_mlm_loss"),
], ids=["cdan", "mmd", "coral", "label-shift", "self-training", "lora-target-mlm"])
def test_every_objective_trains_through_the_stage_and_reports_itself(domains, tmp_path, objectives, logged):
    seen = {}
    env = StageEnv(work_dir=tmp_path, seed=0, log_metrics=lambda step, metrics: seen.update(metrics))
    result = stage.run(config(max_steps=8, eval_every=8, guard={"enabled": False}, **objectives), inputs(domains),
                       env)
    assert logged in seen and seen[logged] == seen[logged], (logged, sorted(seen))  # present, not NaN
    assert head_labels(result.checkpoint.uri) == ["negative", "positive"]
    if objectives.get("reweight_source"):
        weights = [seen["source_weight.negative"], seen["source_weight.positive"]]
        assert weights != [1.0, 1.0] and all(w > 0 for w in weights)


def test_an_adaptation_with_nothing_target_side_is_its_own_reference(domains, tmp_path):
    result = stage.run(config(max_steps=4, eval_every=4).source_only(), inputs(domains),
                       StageEnv(work_dir=tmp_path, seed=0))
    assert result.accepted and result.reference == result.adapted == result.checkpoint
    assert not (Path(result.adapted.uri).parent / "reference").exists(), "trained once, not twice"


def test_recipe_settings_the_target_mlm_cannot_use_are_refused_when_the_recipe_loads():
    from adaptflow.recipe import RecipeError, load_recipe

    with pytest.raises(ValueError, match=r"head_warmup_steps \(300\) must be < max_steps \(300\)"):
        config(max_steps=300, target_mlm={"head_warmup_steps": 300})
    with pytest.raises(RecipeError, match="needs an encoder"):
        load_recipe(DOMAINS / "sentiment.yaml", ["model.name=null", "model.tiny.architecture=gpt2"])


def test_keeping_a_carried_head_of_other_labels_is_refused_before_training(tmp_path):
    from adaptflow.recipe import load_recipe

    recipe = load_recipe(DOMAINS / "sentiment.yaml")
    rows = SimpleNamespace(rows=500)
    tasks = {"books": SimpleNamespace(labels=["negative", "positive"], train=rows),
             "kitchen": SimpleNamespace(labels=["negative", "neutral", "positive"], train=rows)}
    problems = finetune.check_data(recipe, {}, tasks)
    assert len(problems) == 1 and "carried_head: keep" in problems[0] and "reinitialise" in problems[0]
    tasks["kitchen"] = SimpleNamespace(labels=["negative", "positive"], train=rows)
    assert finetune.check_data(recipe, {}, tasks) == []
    # A classifier given as model.path, with no stage before fine-tuning to replace its head, is checked too.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                      "id2label": {"0": "bad", "1": "good"}}))
    alone = load_recipe(DOMAINS / "sentiment.yaml", ["model.name=null", f"model.path={tmp_path}",
                                                     "stages.pretrain.enabled=false", "stages.adapt.enabled=false"])
    problems = finetune.check_data(alone, {}, tasks)
    assert len(problems) == 1 and "model.path's classifier head predicts ['bad', 'good']" in problems[0]
    after_pretraining = load_recipe(DOMAINS / "sentiment.yaml", ["model.name=null", f"model.path={tmp_path}",
                                                                 "stages.adapt.enabled=false"])
    assert finetune.check_data(after_pretraining, {}, tasks) == []


def test_warming_an_untrained_mlm_head_under_zero3_is_refused_before_a_step(domains, tmp_path, monkeypatch):
    """ZeRO-3 partitions the embeddings the warming head's decoder is tied to, so holding them fixed by a
    detached copy cannot work there: a clear error, naming the ways out, before any training step."""
    from transformers import AutoModel, AutoTokenizer

    from adaptflow.errors import ConfigError
    from adaptflow.models import checkpoint_digest
    from adaptflow.refs import CheckpointRef

    AutoModel.from_pretrained(domains["base"].uri).save_pretrained(tmp_path / "encoder")  # no MLM head
    AutoTokenizer.from_pretrained(domains["base"].uri).save_pretrained(tmp_path / "encoder")
    bare = CheckpointRef(uri=str(tmp_path / "encoder"), digest=checkpoint_digest(tmp_path / "encoder"), stage="base")
    monkeypatch.setattr(stage, "make_engine", lambda *a, **k: SimpleNamespace(zero_stage=3))
    monkeypatch.setattr(stage, "train", lambda *a, **k: pytest.fail("training started"))
    settings = config(max_steps=8, adversary="none", target_mlm={"head_warmup_steps": 2})
    with pytest.raises(ConfigError, match=r"ZeRO-2 .*pretrain first.*head_warmup_steps: 0"):
        stage.run(settings, dataclasses.replace(inputs(domains), base=bare), StageEnv(work_dir=tmp_path, seed=0))
