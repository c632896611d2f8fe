"""Each adaptation objective, on a toy with the kind of domain shift it is meant for, improves target accuracy
over source-only training with the same model, seeds and steps — through the stage's objective and training loop.

- shifted blobs with a domain cue (covariate shift): the domain adversaries (DANN, CDAN) and moment matching
  (MMD, CORAL) must find the feature that undoes the shift;
- bag-of-words reviews whose target sentiment words never occur in labelled source text, only beside shared
  sentiment words in unlabelled target text: the target masked LM and self-training must carry the label over;
- label shift (the same classes, a different prior): reweighting the source loss toward the estimated target
  prior must move the decision threshold.
"""

from __future__ import annotations

import functools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaptflow.objectives.adaptation import (
    AdaptationModel,
    DomainAdaptation,
    DomainDiscriminator,
    PairedSampler,
    class_balanced_pseudo_labels,
    label_shift_weights,
)
from adaptflow.objectives.mlm import MaskedLM
from adaptflow.objectives.padding import pad_batch
from adaptflow.train import BatchSampler, LoopSettings, train

SEEDS = (0, 1)
STEPS = 300


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small run ten times faster on one thread than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def accuracy(model: AdaptationModel, items: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        logits, _ = model(pad_batch(items, 0))
    return (logits.argmax(-1) == torch.tensor([item["label"] for item in items])).float().mean().item()


def predict(model: AdaptationModel, items: list[dict]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        logits, _ = model(pad_batch(items, 0))
    model.train()
    return logits.softmax(-1).numpy()


def adapt(model: AdaptationModel, objective: DomainAdaptation, source, target, seed: int, *, lambda_max=0.0,
          relabel=None) -> None:
    """The adapt stage's loop: λ on Ganin's schedule; `relabel(step)` at a third and two thirds of training."""
    sampler = PairedSampler(BatchSampler(source, 32, seed), BatchSampler(target, 32, seed + 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def before_step(step: int) -> None:
        objective.weight = lambda_max * (2 / (1 + math.exp(-10 * step / STEPS)) - 1)
        if relabel is not None and step in (STEPS // 3, 2 * STEPS // 3):
            relabel(step)

    train(model, objective, sampler, optimizer, LoopSettings(max_steps=STEPS, seed=seed, log_every=STEPS),
          device=torch.device("cpu"), step_hooks=[before_step])


class Points(torch.nn.Module):
    """Each example is one token whose fixed 'embedding' is its coordinates; one tanh layer encodes it."""

    def __init__(self, points: np.ndarray, width: int = 8):
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(torch.tensor(points, dtype=torch.float32), freeze=True)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(points.shape[1], width), torch.nn.Tanh())
        self.classifier = torch.nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.classifier(self.encoder(self.table(input_ids[:, 0]))))


def point_items(points: list[np.ndarray], labels: list[np.ndarray | None]):
    """(embedding table, one item list per set): set k's example i is token 1 + offset + i."""
    table, sets, offset = [np.zeros((1, points[0].shape[1]))], [], 1
    for x, y in zip(points, labels, strict=True):
        table.append(x)
        sets.append([{"input_ids": [offset + i], "label": 0 if y is None else int(y[i]), "index": i}
                     for i in range(len(x))])
        offset += len(x)
    return np.concatenate(table), sets


# -- covariate shift: the domain adversaries and moment matching ------------------------------------------------

def blobs(n: int, rng, *, target: bool):
    """Label by x1 (±1, noise 0.5); the target is moved by +2 along x1 and tells itself apart by x2 ≈ 3."""
    y = rng.integers(0, 2, n)
    x1 = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 0.5, n) + (2.0 if target else 0.0)
    x2 = rng.normal(3.0 if target else 0.0, 0.3, n)
    return np.stack([x1, x2], 1), y


@functools.cache
def shifted_blobs(arm: str, seed: int) -> float:
    rng = np.random.default_rng(0)
    (xs, ys), (xt, _), (xh, yh) = blobs(300, rng, target=False), blobs(300, rng, target=True), blobs(300, rng,
                                                                                                      target=True)
    table, (source, target, held) = point_items([xs, xt, xh], [ys, None, yh])
    torch.manual_seed(seed)
    conditional = arm == "cdan"
    model = AdaptationModel(Points(table), DomainDiscriminator(8 * (2 if conditional else 1), [16], dropout=0.0),
                            conditional=conditional)
    objective = DomainAdaptation(0, conditional=conditional, moment=arm if arm in ("mmd", "coral") else None)
    adapt(model, objective, source, target, seed, lambda_max=1.0 if arm in ("dann", "cdan") else 0.0)
    return accuracy(model, held)


@pytest.mark.parametrize(("arm", "gain"), [("dann", 0.2), ("cdan", 0.2), ("mmd", 0.3), ("coral", 0.1)])
def test_feature_alignment_undoes_a_covariate_shift(arm, gain):
    source_only = [shifted_blobs("source_only", seed) for seed in SEEDS]
    adapted = [shifted_blobs(arm, seed) for seed in SEEDS]
    assert max(source_only) < 0.6, "source-only training should not transfer across this shift"
    assert all(a > s for a, s in zip(adapted, source_only, strict=True)), (adapted, source_only)
    assert np.mean(adapted) >= np.mean(source_only) + gain, (adapted, source_only)


# -- target-only words: target masked LM and self-training ------------------------------------------------------

SPECIAL = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
SHARED = {1: ["good", "great"], 0: ["bad", "awful"]}
BOOKS = {"topic": "novel author chapter plot story reader".split(), 1: ["gripping", "moving"], 0: ["boring", "dull"]}
KITCHEN = {"topic": "pan knife blender kettle pot stove".split(), 1: ["sturdy", "sharp"], 0: ["flimsy", "leaky"]}
VOCAB = SPECIAL + sorted({w for words in (SHARED, BOOKS, KITCHEN) for group in words.values() for w in group})


class Vocabulary:
    """What a MaskedLM needs of a tokenizer."""

    mask_token_id = 3
    all_special_ids = [0, 1, 2, 3]

    def __len__(self):
        return len(VOCAB)

    def convert_ids_to_tokens(self, ids):
        return [VOCAB[i] for i in ids]


def reviews(domain: dict, n: int, rng: random.Random) -> list[dict]:
    """Four topic words and one of the domain's own sentiment words; half the reviews add a shared one."""
    out = []
    for i in range(n):
        label = rng.randrange(2)
        words = rng.choices(domain["topic"], k=4) + rng.choices(domain[label], k=1)
        if rng.random() < 0.5:
            words += rng.choices(SHARED[label], k=1)
        rng.shuffle(words)
        out.append({"input_ids": [1, *(VOCAB.index(w) for w in words), 2], "label": label, "index": i})
    return out


class Mixer(torch.nn.Module):
    """An encoder in miniature: each position's embedding plus the mean of the sentence's (its context)."""

    def __init__(self, width: int):
        super().__init__()
        self.embeddings = torch.nn.Embedding(len(VOCAB), width, padding_idx=0)
        torch.nn.init.normal_(self.embeddings.weight, std=0.1)

    def forward(self, input_ids, attention_mask, **_):
        embedded = self.embeddings(input_ids)
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(last_hidden_state=embedded + (embedded * mask).sum(1, keepdim=True) / mask.sum(1,
                                                                                                      keepdim=True))


class Reviewer(torch.nn.Module):
    """A sequence classifier shaped like a Hugging Face one: `base_model`, mean pooling, a `classifier` head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.base_model = Mixer(width)
        self.classifier = torch.nn.Linear(width, 2)

    def get_input_embeddings(self):
        return self.base_model.embeddings

    def forward(self, input_ids, attention_mask, **_):
        hidden = self.base_model(input_ids, attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(logits=self.classifier((hidden * mask).sum(1) / mask.sum(1)))


class TiedHead(torch.nn.Module):
    """An MLM head whose decoder is the classifier's input embeddings, as BERT's is."""

    def __init__(self, embeddings: torch.nn.Embedding):
        super().__init__()
        self.embeddings = embeddings
        self.bias = torch.nn.Parameter(torch.zeros(len(VOCAB)))

    def forward(self, hidden):
        return hidden @ self.embeddings.weight.T + self.bias


@functools.cache
def target_words(arm: str, seed: int) -> float:
    rng = random.Random(0)
    source, target, held = reviews(BOOKS, 400, rng), reviews(KITCHEN, 400, rng), reviews(KITCHEN, 400, rng)
    torch.manual_seed(seed)
    classifier = Reviewer()
    mlm = arm == "target_mlm"
    model = AdaptationModel(classifier, DomainDiscriminator(16, [16], dropout=0.0),
                            TiedHead(classifier.get_input_embeddings()) if mlm else None)
    objective = DomainAdaptation(0, masker=MaskedLM(Vocabulary(), probability=0.15) if mlm else None,
                                 mlm_weight=1.0 if mlm else 0.0)

    def pseudo_label(step: int) -> None:
        objective.pseudo_labels = class_balanced_pseudo_labels(predict(model, target), threshold=0.9,
                                                               per_class=len(target) // 4)

    adapt(model, objective, source, target, seed, relabel=pseudo_label if arm == "self_training" else None)
    return accuracy(model, held)


@pytest.mark.parametrize(("arm", "gain"), [("target_mlm", 0.04), ("self_training", 0.1)])
def test_target_objectives_carry_labels_to_words_seen_only_in_target_text(arm, gain):
    source_only = [target_words("source_only", seed) for seed in SEEDS]
    adapted = [target_words(arm, seed) for seed in SEEDS]
    assert all(a > s for a, s in zip(adapted, source_only, strict=True)), (adapted, source_only)
    assert np.mean(adapted) >= np.mean(source_only) + gain, (adapted, source_only)


# -- label shift: reweighting toward the target prior ----------------------------------------------------------

def gaussians(n: int, rng, positive_rate: float):
    y = (rng.random(n) < positive_rate).astype(int)
    return np.stack([np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1, n), np.zeros(n)], 1), y


@functools.cache
def label_shift(arm: str, seed: int) -> tuple[float, tuple[float, ...]]:
    """Target accuracy, and the target prior of positives estimated at each relabelling (true prior 0.85)."""
    rng = np.random.default_rng(0)
    (xs, ys), (xt, _), (xh, yh) = gaussians(400, rng, 0.5), gaussians(400, rng, 0.85), gaussians(1000, rng, 0.85)
    table, (source, target, held) = point_items([xs, xt, xh], [ys, None, yh])
    torch.manual_seed(seed)
    model = AdaptationModel(Points(table), DomainDiscriminator(8, [8], dropout=0.0))
    objective = DomainAdaptation(0)
    source_prior = np.bincount(ys, minlength=2) / len(ys)
    estimates = []

    def reweight(step: int) -> None:
        prior = predict(model, target).mean(0)
        estimates.append(float(prior[1]))
        objective.class_weights = torch.tensor(label_shift_weights(prior, source_prior), dtype=torch.float32)

    adapt(model, objective, source, target, seed, relabel=reweight if arm == "reweight" else None)
    return accuracy(model, held), tuple(estimates)


def test_reweighting_toward_the_target_prior_corrects_a_label_shift():
    source_only = [label_shift("source_only", seed)[0] for seed in SEEDS]
    reweighted = [label_shift("reweight", seed) for seed in SEEDS]
    assert all(a > s for (a, _), s in zip(reweighted, source_only, strict=True)), (reweighted, source_only)
    assert np.mean([a for a, _ in reweighted]) >= np.mean(source_only) + 0.04
    for _, (first, second) in reweighted:  # the estimate moves from 0.5 toward the true 0.85
        assert 0.55 < first < second < 0.9
