"""Unsupervised domain adaptation: a task loss on labelled source examples plus target-side objectives that use
unlabelled target text, composed in one objective for the one training loop.

- Domain adversary (DANN; Ganin et al., 2016): a discriminator behind a gradient-reversal layer tries to tell
  source from target features; the encoder receives its gradient reversed and scaled by λ. CDAN (Long et al.,
  2018) conditions the discriminator on features ⊗ class probabilities, so it aligns the class-conditional
  distributions, not only the marginals.
- Moment matching: MMD with a multi-bandwidth Gaussian kernel (Long et al., 2015) or CORAL (Sun & Saenko, 2016)
  between the source and target features of a batch.
- Target masked LM mixed with the task loss (UDALM; Karouzos et al., 2021): the shared encoder keeps modelling
  target text while it learns the source task.
- Self-training: cross-entropy on pseudo-labels of confident target examples, chosen class-balanced by the stage
  (`class_balanced_pseudo_labels`) and looked up by each target item's `index`.
- Label-shift correction: source examples weighted by p_target(y) / p_source(y) (`class_weights`).

Each term is a mean scaled by its weight and by the batch's source-target count, so after the loop divides the sum
by the targets of the window the objective is: task mean + λ-reversed domain BCE + moment weight · MMD/CORAL +
mlm weight · target MLM + pseudo weight · pseudo-label CE.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptflow.data.blocks import PackedBatch
from adaptflow.kinds.classification import SequenceClassification
from adaptflow.objectives.mlm import IGNORE, split_mlm_head
from adaptflow.objectives.padding import model_inputs, pad_batch

NO_LABEL = -1  # a target item without a pseudo-label


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


def conditioned(features: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """CDAN's multilinear map: the outer product features ⊗ class probabilities, flattened [n, classes × d]."""
    return torch.bmm(probabilities.unsqueeze(2), features.unsqueeze(1)).flatten(1)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)) -> torch.Tensor:
    """Squared maximum mean discrepancy (biased estimate) under a sum of Gaussian kernels whose widths are
    multiples of the median pairwise squared distance: 0 for identical samples, positive when they differ."""
    joint = torch.cat([x, y]).float()
    distances = torch.cdist(joint, joint).pow(2)
    scale = distances.detach().median().clamp_min(1e-6)
    kernel = sum(torch.exp(-distances / (scale * b)) for b in bandwidths)
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def coral(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CORAL: ‖Cov(x) − Cov(y)‖²_F / (4 d²)."""
    d = x.shape[1]

    def covariance(z: torch.Tensor) -> torch.Tensor:
        z = z.float() - z.float().mean(0, keepdim=True)
        return z.T @ z / max(1, len(z) - 1)

    return (covariance(x) - covariance(y)).pow(2).sum() / (4 * d * d)


MOMENTS = {"mmd": mmd, "coral": coral}


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


class AdaptationModel(nn.Module):
    """A sequence classifier, a domain discriminator on the features its head reads, and — for the target masked
    LM — an MLM head on the classifier's own encoder (its decoder tied to the classifier's input embeddings).

    The features are captured by a hook on the input of the classifier head (BERT's pooled [CLS]), so the
    representation that is aligned is exactly the one the task head uses.
    """

    def __init__(self, classifier: nn.Module, discriminator: DomainDiscriminator, mlm_head: nn.Module | None = None,
                 *, conditional: bool = False):
        super().__init__()
        self.classifier = classifier
        self.discriminator = discriminator
        self.mlm_head = mlm_head
        self.conditional = conditional  # CDAN: the discriminator reads features ⊗ class probabilities
        self._features: torch.Tensor | None = None
        _head_module(classifier).register_forward_pre_hook(self._capture)

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

    def mlm_logits(self, batch: dict, *, through_encoder: bool = True) -> torch.Tensor:
        """Vocabulary logits at the masked positions of `batch` (`labels` ≠ IGNORE), through the shared encoder.
        `through_encoder=False` stops the gradient at the head: the encoder's output and the decoder tied to its
        input embeddings are both held fixed, so only the head's own layers learn."""
        classifier = self.classifier.get_base_model() if hasattr(self.classifier, "get_base_model") else self.classifier
        masked = batch["labels"] != IGNORE
        if through_encoder:  # (a PEFT model's own base_model is its tuner, not the encoder: unwrap it first)
            return self.mlm_head(classifier.base_model(**model_inputs(batch)).last_hidden_state[masked])
        with torch.no_grad():
            hidden = classifier.base_model(**model_inputs(batch)).last_hidden_state[masked]
        encoder = {id(p) for p in classifier.parameters()}
        fixed = {name: p.detach() for name, p in self.mlm_head.named_parameters(remove_duplicate=False)
                 if id(p) in encoder}
        return torch.func.functional_call(self.mlm_head, fixed, (hidden,), strict=False)


def attach_mlm_head(classifier: nn.Module, lm_model: nn.Module) -> nn.Module:
    """The MLM head of `lm_model` (a masked LM loaded from the same checkpoint), its decoder tied to the
    classifier's input embeddings as the masked LM ties it to its own. `head.prefix` is the head's name in the
    masked LM (`cls`, `lm_head`), so its weights can be saved under the names a masked LM loads."""
    _, head = split_mlm_head(lm_model)
    if head is None:
        raise ValueError(f"{type(lm_model).__name__} has no MLM head to train on target text")
    decoder = lm_model.get_output_embeddings()
    if decoder is not None and decoder.weight is lm_model.get_input_embeddings().weight:
        decoder.weight = classifier.get_input_embeddings().weight
    head.prefix = next(name for name, module in lm_model.named_children() if module is head)
    return head


class DomainAdaptation:
    """The adapt stage's objective for the one training loop. Items are (source examples, target examples) pairs.

    `weight` (λ) is set by a step hook from the schedule and scales only the *reversed* gradient: the
    discriminator always learns at full strength, the encoder is pushed against it by λ (λ = 0: a spectator
    discriminator, whose accuracy still says how separable the domains are). The stage sets `pseudo_labels` (one
    per target item, by its `index`) and `class_weights` (label-shift correction of the source loss) as training
    goes. Running domain loss, discriminator accuracy and the other terms are
    accumulated (without host syncs) for the evaluation callback to read and reset.
    """

    name = "adaptation"

    def __init__(self, pad_id: int, *, conditional: bool = False, moment: str | None = None,
                 moment_weight: float = 1.0, masker=None, mlm_weight: float = 0.0, pseudo_weight: float = 1.0):
        self.pad_id = pad_id
        self.conditional = conditional
        self.moment = MOMENTS[moment] if moment else None
        self.moment_weight = moment_weight
        self.masker = masker  # a MaskedLM: masks target tokens for the target masked LM
        self.mlm_weight = mlm_weight
        self.pseudo_weight = pseudo_weight
        self.class_weights: torch.Tensor | None = None
        self.pseudo_labels: np.ndarray | None = None  # per target item (by its "index"); NO_LABEL for none
        self.mlm_reaches_encoder = True  # False while an untrained MLM head warms up alone
        self.weight = 0.0
        self.reset_stats()

    def reset_stats(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}

    def collate(self, pair, generator=None) -> dict:
        """The source batch, with the target batch, its pseudo-labels and MLM masks beside it; which target terms
        the batch has are decided here, on the host, so the loss needs no device sync to know."""
        source, target = pair
        batch = SequenceClassification(self.pad_id, self.class_weights).collate(source)
        batch["target"] = pad_batch(target, self.pad_id)
        pseudo = self.pseudo_labels
        batch["target_pseudo"] = torch.tensor([NO_LABEL if pseudo is None else int(pseudo[item["index"]])
                                               for item in target], dtype=torch.long)
        batch["has_pseudo"] = bool((batch["target_pseudo"] != NO_LABEL).any())
        batch["has_mlm"] = False
        if self.masker is not None and self.mlm_weight:
            masked = self.masker.collate(PackedBatch(batch["target"]["input_ids"]), generator)
            batch["target_mlm"] = {"input_ids": masked["input_ids"], "labels": masked["labels"],
                                   "attention_mask": batch["target"]["attention_mask"]}
            batch["has_mlm"] = bool((masked["labels"] != IGNORE).any())
        return batch

    def loss(self, model: AdaptationModel, batch: dict) -> torch.Tensor:
        logits, source_features = model(batch)
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        total = F.cross_entropy(logits, batch["labels"], weight=weight, reduction="sum")
        scale = batch["n_targets"]  # every other term is a mean, weighted like the source examples' loss
        # Without a reversed gradient, moment matching or pseudo-labels, target features only feed the (spectator)
        # discriminator: no graph through the encoder for them.
        target_trains = bool(self.weight) or self.moment is not None or batch["has_pseudo"]
        with contextlib.nullcontext() if target_trains else torch.no_grad():
            target_logits, target_features = model(batch["target"])

        features = torch.cat([source_features, target_features])
        if self.conditional:
            features = conditioned(features, torch.cat([logits, target_logits]).float().softmax(-1).detach())
        domains = torch.cat([torch.zeros(len(source_features)), torch.ones(len(target_features))]).to(features)
        domain_logits = model.discriminator(grad_reverse(features, self.weight) if self.weight else features.detach())
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits.float(), domains.float())
        total = total + scale * domain_loss
        self._track("domain_loss", domain_loss.detach())
        self._track("discriminator_accuracy", ((domain_logits > 0).float() == domains).float().mean().detach())

        if self.moment is not None:
            distance = self.moment(source_features, target_features)
            total = total + scale * self.moment_weight * distance
            self._track("moment_distance", distance.detach())
        pseudo = batch["target_pseudo"]
        if batch["has_pseudo"]:
            labelled = pseudo != NO_LABEL
            pseudo_loss = F.cross_entropy(target_logits[labelled], pseudo[labelled])
            total = total + scale * self.pseudo_weight * pseudo_loss * labelled.float().mean()
            self._track("pseudo_label_loss", pseudo_loss.detach())
        if batch["has_mlm"]:
            mlm_batch = batch["target_mlm"]
            mlm_loss = F.cross_entropy(model.mlm_logits(mlm_batch, through_encoder=self.mlm_reaches_encoder).float(),
                                       mlm_batch["labels"][mlm_batch["labels"] != IGNORE])
            total = total + scale * self.mlm_weight * mlm_loss
            self._track("target_mlm_loss", mlm_loss.detach())
        return total

    def training_stats(self) -> dict[str, float]:
        stats = {f"train_{k}": float(v.item() / self._counts[k]) for k, v in self._sums.items()}
        if stats:
            stats["lambda"] = self.weight
        self.reset_stats()
        return stats

    def _track(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + 1


class PairedSampler:
    """Micro-batch i = (source batch i, target batch i): every step sees as many target as source examples."""

    def __init__(self, source, target):
        self.source, self.target = source, target
        self.per_epoch = source.per_epoch

    def __call__(self, index: int):
        return self.source(index), self.target(index)


def class_balanced_pseudo_labels(probabilities: np.ndarray, *, threshold: float | None, per_class: int
                                 ) -> np.ndarray:
    """Pseudo-labels for rows of class probabilities, as many for every class, so the labels cannot drift onto
    the class the model favours; every other row gets NO_LABEL.

    With a `threshold`: each class's most confident rows among those predicted as it at least that confidently,
    k of each, where k is `per_class` or the count of the class with the fewest such rows, if smaller. Without
    (top-k): (row, class) pairs in decreasing probability, each taken while its row is free and its class has
    fewer than `per_class` — so even a class the model never predicts gets its most likely rows."""
    labels = np.full(len(probabilities), NO_LABEL, dtype=np.int64)
    classes = range(probabilities.shape[1])
    if threshold is None:
        taken = np.zeros(probabilities.shape[1], dtype=np.int64)
        for flat in np.argsort(-probabilities, axis=None, kind="stable"):
            row, c = divmod(int(flat), probabilities.shape[1])
            if labels[row] == NO_LABEL and taken[c] < per_class:
                labels[row], taken[c] = c, taken[c] + 1
                if taken.min() == per_class:
                    break
        return labels
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    eligible = [np.flatnonzero((predicted == c) & (confidence >= threshold)) for c in classes]
    k = min(per_class, *(len(rows) for rows in eligible))
    for c, rows in enumerate(eligible):
        labels[rows[np.argsort(-confidence[rows], kind="stable")[:k]]] = c
    return labels


def label_shift_weights(target_prior: np.ndarray, source_prior: np.ndarray) -> np.ndarray:
    """Per-class weights p_target(y) / p_source(y) for the source loss, scaled so that the source examples'
    average weight stays 1 (Σ p_source · w = 1)."""
    ratio = target_prior / np.clip(source_prior, 1e-12, None)
    return ratio / float((source_prior * ratio).sum())


def _head_module(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ValueError(f"{type(model).__name__} has no classifier/score head to read features from")
