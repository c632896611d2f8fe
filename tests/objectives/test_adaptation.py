"""The adaptation objectives compute what they claim: the reversed gradient, masks on target text only,
class-balanced confident pseudo-labels, CDAN's conditioning, moment distances, label-shift weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaptflow.objectives.adaptation import (
    NO_LABEL,
    AdaptationModel,
    DomainAdaptation,
    DomainDiscriminator,
    class_balanced_pseudo_labels,
    conditioned,
    coral,
    label_shift_weights,
    mmd,
)
from adaptflow.objectives.mlm import IGNORE, MaskedLM


def test_mmd_and_coral_are_zero_for_identical_batches_and_grow_with_a_shift():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    assert mmd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert coral(x, x.clone()).item() == pytest.approx(0.0, abs=1e-9)
    near, far = x + 0.1, x * 3 + 2
    assert 0 < mmd(x, near).item() < mmd(x, far).item()
    assert coral(x, x * 3).item() > coral(x, x * 1.1).item() > 0


def test_cdan_conditions_on_the_outer_product_of_features_and_probabilities():
    features, probs = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.25, 0.75]])
    assert torch.equal(conditioned(features, probs), torch.tensor([[0.25, 0.5, 0.75, 0.75, 1.5, 2.25]]))


def test_pseudo_labels_take_only_confident_rows_and_as_many_of_every_class():
    probs = np.array([[0.99, 0.01], [0.97, 0.03], [0.95, 0.05], [0.6, 0.4], [0.08, 0.92], [0.3, 0.7],
                      [0.04, 0.96]])
    # class 0 has three confident rows, class 1 two: two each, the most confident, within a quota of 3
    assert class_balanced_pseudo_labels(probs, threshold=0.9, per_class=3).tolist() == \
        [0, 0, NO_LABEL, NO_LABEL, 1, NO_LABEL, 1]
    assert class_balanced_pseudo_labels(probs, threshold=None, per_class=1).tolist() == \
        [0, NO_LABEL, NO_LABEL, NO_LABEL, NO_LABEL, NO_LABEL, 1]
    assert class_balanced_pseudo_labels(probs, threshold=0.98, per_class=3).tolist() == [NO_LABEL] * 7, \
        "a class without a confident row: nobody is pseudo-labelled"
    one_sided = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # class 1 is never predicted …
    assert class_balanced_pseudo_labels(one_sided, threshold=None, per_class=1).tolist() == \
        [0, NO_LABEL, NO_LABEL, 1]  # … top-k still gives it its most likely row
    three = np.array([[0.45, 0.5, 0.05], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
    # row 0 is predicted 1 but ranks second for class 0: it is not class 0's, class 0 takes row 1
    assert class_balanced_pseudo_labels(three, threshold=None, per_class=1).tolist() == [NO_LABEL, 0, 2, 1]


def test_label_shift_weights_move_the_source_prior_to_the_target_one_and_keep_the_mean_weight():
    source, target = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    weights = label_shift_weights(target, source)
    assert weights[0] / weights[1] == pytest.approx(4.0)
    assert float((source * weights).sum()) == pytest.approx(1.0)
    assert np.allclose(source * weights / (source * weights).sum(), target)


class Encoder(torch.nn.Module):
    """A stand-in for a sequence classifier: embeddings, mean pooling, a linear head named like BERT's."""

    def __init__(self, vocab=20, width=6, classes=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.classifier = torch.nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None, **_):
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(logits=self.classifier((self.embed(input_ids) * mask).sum(1) / mask.sum(1)))


class Tokenizer:
    """The little a MaskedLM needs of a tokenizer: ids 0 (pad), 1 (cls), 2 (sep), 3 (mask) are special."""

    mask_token_id = 3
    all_special_ids = [0, 1, 2, 3]

    def __len__(self):
        return 20

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def items(rows):
    return [{"input_ids": ids, "label": label, "index": i} for i, (ids, label) in enumerate(rows)]


def test_masked_lm_masks_target_tokens_only_and_never_padding():
    source = items([([1, 5, 6, 7, 2], 0), ([1, 8, 9, 2], 1)])
    target = items([([1, 10, 11, 12, 13, 14, 15, 2], 0), ([1, 16, 2], 0)])
    objective = DomainAdaptation(0, masker=MaskedLM(Tokenizer(), probability=0.9), mlm_weight=1.0)
    batch = objective.collate((source, target), torch.Generator().manual_seed(0))
    mlm = batch["target_mlm"]
    masked = mlm["labels"] != IGNORE
    assert masked.any()
    padded = batch["target"]["attention_mask"] == 0
    special = torch.isin(batch["target"]["input_ids"], torch.tensor([0, 1, 2, 3]))
    assert not (masked & (padded | special)).any(), "only real, non-special target tokens are predicted"
    assert torch.equal(mlm["labels"][masked], batch["target"]["input_ids"][masked])
    assert torch.equal(batch["input_ids"][0, :5], torch.tensor([1, 5, 6, 7, 2])), "source text is never masked"


def test_pseudo_labels_reach_the_loss_for_the_target_items_that_have_one():
    torch.manual_seed(0)
    encoder = Encoder()
    model = AdaptationModel(encoder, DomainDiscriminator(6, [4], dropout=0.0))
    source = items([([1, 5, 6, 2], 0), ([1, 7, 8, 2], 1)])
    target = items([([1, 10, 11, 2], 0), ([1, 12, 13, 2], 0)])
    objective = DomainAdaptation(0, pseudo_weight=1.0)
    without = objective.loss(model, objective.collate((source, target)))
    objective.pseudo_labels = np.array([1, NO_LABEL])
    batch = objective.collate((source, target))
    assert batch["target_pseudo"].tolist() == [1, NO_LABEL]
    with_pseudo = objective.loss(model, batch)
    target_logits, _ = model(batch["target"])
    expected = 2 * torch.nn.functional.cross_entropy(target_logits[:1], torch.tensor([1])) * 0.5
    assert (with_pseudo - without).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cdan_gives_the_discriminator_no_gradient_into_the_class_probabilities():
    """CDAN conditions on the probabilities but (as its authors do) does not train the head through them."""
    torch.manual_seed(0)
    encoder = Encoder()
    model = AdaptationModel(encoder, DomainDiscriminator(12, [4], dropout=0.0), conditional=True)
    source, target = items([([1, 5, 6, 2], 0), ([1, 7, 8, 2], 1)]), items([([1, 10, 11, 2], 0), ([1, 12, 2], 0)])
    objective = DomainAdaptation(0, conditional=True)
    objective.weight = 1.0
    batch = objective.collate((source, target))
    logits, features = model(batch)
    target_logits, target_features = model(batch["target"])
    with torch.no_grad():
        joint = conditioned(torch.cat([features, target_features]), torch.cat([logits, target_logits]).softmax(-1))
    assert joint.shape == (4, 12)
    objective.loss(model, batch).backward()
    task_only = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
    head_grad = encoder.classifier.weight.grad.clone()
    encoder.zero_grad()
    task_only.backward()
    torch.testing.assert_close(head_grad, encoder.classifier.weight.grad)  # the domain term left the head alone


@pytest.mark.parametrize("through_encoder", [False, True])
def test_a_warming_mlm_head_learns_alone_its_tied_decoder_included(tiny_bert, through_encoder):
    """During the head warm-up the target MLM's gradient stops at the head: neither the encoder's layers nor the
    decoder tied to its input embeddings move; afterwards both do."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from adaptflow.objectives.adaptation import attach_mlm_head

    config = tiny_bert[0].config
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(config)
    model = AdaptationModel(classifier, DomainDiscriminator(config.hidden_size, [4]),
                            attach_mlm_head(classifier, BertForMaskedLM(config)))
    ids = torch.randint(5, config.vocab_size, (2, 8))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 2:5] = ids[:, 2:5]
    model.mlm_logits({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                     through_encoder=through_encoder).logsumexp(-1).sum().backward()
    embeddings = classifier.get_input_embeddings().weight
    encoder_layer = classifier.bert.encoder.layer[0].attention.self.query.weight
    assert model.mlm_head.predictions.transform.dense.weight.grad.abs().sum() > 0
    for parameter in (embeddings, encoder_layer):
        moved = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        assert moved == through_encoder
    assert model.mlm_head.predictions.decoder.weight is embeddings, "the decoder stays tied"
