"""Domain-adversarial training (DANN; Ganin et al., 2016): a task loss on labelled source examples plus a
domain discriminator, behind a gradient-reversal layer, that tries to tell source from target features.

The encoder receives the discriminator's gradient reversed and scaled by λ, so it learns features the
discriminator cannot separate while the task head keeps them useful for the source labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adaptflow.kinds.classification import SequenceClassification
from adaptflow.objectives.padding import model_inputs, pad_batch


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; gradient multiplied by −`scale` backward."""
    return _GradientReversal.apply(x, scale)


def adversarial_weight(schedule: str, progress: float, *, gamma: float = 10.0, maximum: float = 1.0,
                       warm_start: float = 0.0) -> float:
    """λ at training progress p ∈ [0, 1].

    ganin: maximum · (2 / (1 + exp(−γ p)) − 1), rising from 0 to ≈ maximum; constant: maximum;
    warm_start: 0 until p reaches `warm_start`, then the Ganin ramp over the rest of training.
    """
    if schedule == "constant":
        return maximum
    if schedule == "warm_start":
        if progress < warm_start:
            return 0.0
        progress = (progress - warm_start) / max(1e-9, 1 - warm_start)
    return maximum * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


class DomainDiscriminator(nn.Module):
    """MLP: features → hidden layers (ReLU, dropout) → one logit (target = 1, source = 0)."""

    def __init__(self, features: int, hidden: list[int], dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class DANNModel(nn.Module):
    """A sequence classifier plus a domain discriminator on the features its head reads.

    The features are captured by a hook on the input of the classifier head (BERT's pooled [CLS]), so the
    representation that is aligned is exactly the one the task head uses.
    """

    def __init__(self, classifier: nn.Module, discriminator: DomainDiscriminator):
        super().__init__()
        self.classifier = classifier
        self.discriminator = discriminator
        self._features: torch.Tensor | None = None
        head = _head_module(classifier)
        head.register_forward_pre_hook(self._capture)

    def _capture(self, module, inputs):
        self._features = inputs[0]

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task logits, pooled features) for a padded batch."""
        logits = self.classifier(**model_inputs(batch)).logits
        features = self._features
        if features.dim() == 3:  # heads that pool themselves (e.g. RoBERTa's): mean over real tokens
            mask = batch["attention_mask"].unsqueeze(-1).to(features.dtype)
            features = (features * mask).sum(1) / mask.sum(1).clamp_min(1)
        self._features = None
        return logits, features


class DomainAdversarial:
    """The DANN objective for the one training loop.

    Items are (source examples, target examples) pairs; `weight` (λ) is set by a step hook from the
    schedule and scales only the *reversed* gradient: the discriminator always learns at full strength,
    the encoder is pushed against it by λ (λ = 0 is source-only training with a spectator discriminator).
    The loss sum is `task CE sum + n_source · mean domain BCE`, so the loop's division by the source count
    gives task mean + domain mean. Running domain loss and discriminator accuracy are accumulated (without
    host syncs) for the evaluation callback to read and reset.
    """

    name = "dann"

    def __init__(self, pad_id: int):
        self.task = SequenceClassification(pad_id)
        self.pad_id = pad_id
        self.weight = 0.0
        self.reset_stats()

    def reset_stats(self) -> None:
        self._domain_loss = self._domain_correct = self._domain_seen = None

    def collate(self, pair, generator=None) -> dict:
        source, target = pair
        batch = self.task.collate(source)
        batch["target"] = pad_batch(target, self.pad_id)
        return batch

    def loss(self, model: DANNModel, batch: dict) -> torch.Tensor:
        logits, source_features = model(batch)
        task_sum = self.task.loss_from_logits(logits, batch)
        _, target_features = model(batch["target"])
        features = torch.cat([source_features, target_features])
        domains = torch.cat([torch.zeros(len(source_features)), torch.ones(len(target_features))]).to(features)
        domain_logits = model.discriminator(grad_reverse(features, self.weight))
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits.float(), domains.float())
        self._track(domain_loss.detach(), ((domain_logits > 0).float() == domains).sum().detach(), len(domains))
        return task_sum + len(source_features) * domain_loss

    def training_stats(self) -> dict[str, float]:
        if self._domain_seen is None:
            return {}
        stats = {"train_domain_loss": self._domain_loss.item() / self._batches,
                 "train_discriminator_accuracy": self._domain_correct.item() / self._domain_seen,
                 "lambda": self.weight}
        self.reset_stats()
        return stats

    def _track(self, loss: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        if self._domain_seen is None:
            self._domain_loss, self._domain_correct, self._domain_seen, self._batches = loss, correct, seen, 1
        else:
            self._domain_loss = self._domain_loss + loss
            self._domain_correct = self._domain_correct + correct
            self._domain_seen += seen
            self._batches += 1


class PairedSampler:
    """Micro-batch i = (source batch i, target batch i): every step sees as many target as source examples."""

    def __init__(self, source, target):
        self.source, self.target = source, target
        self.per_epoch = source.per_epoch

    def __call__(self, index: int):
        return self.source(index), self.target(index)


def _head_module(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ValueError(f"{type(model).__name__} has no classifier/score head to read features from")
