"""Evaluation suite pieces: seeded perturbations for robustness, pseudo-perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from adaptflow.evaluate import pseudo_perplexity
from adaptflow.labelled import read_conll, read_records
from adaptflow.objectives import build_objective
from adaptflow.perturb import KINDS, perturb_records
from adaptflow.tokenize import pack_blocks, tokenize_corpus
from tests.conftest import DATA_ROOT

CHEMPROT = DATA_ROOT / "biomedical/chemprot/test.jsonl"
NCBI = DATA_ROOT / "biomedical/ncbi_disease_ner/test.txt"


@pytest.fixture(scope="module")
def sentences():
    return read_records(CHEMPROT, fields=["text", "label"], max_rows=200)


@pytest.mark.parametrize("kind", KINDS)
def test_perturbations_are_deterministic_under_a_seed_and_keep_labels(sentences, kind):
    first = perturb_records(sentences, kind, rate=0.15, seed=7)
    assert first == perturb_records(sentences, kind, rate=0.15, seed=7)
    assert first != perturb_records(sentences, kind, rate=0.15, seed=8)
    assert [r["label"] for r in first] == [r["label"] for r in sentences]
    changed = sum(a["text"] != b["text"] for a, b in zip(first, sentences, strict=True))
    assert changed > len(sentences) / 2, f"{kind} changed only {changed} of {len(sentences)} sentences"
    assert perturb_records(sentences, kind, rate=0.0, seed=7) == [dict(r) for r in sentences]


def test_one_examples_noise_does_not_depend_on_the_others(sentences):
    """Example i's noise is a function of (seed, kind, i) alone: different neighbours, same noise."""
    others = [{"text": "short one", "label": "x"}] * 5 + sentences[5:10]
    for kind in KINDS:
        assert perturb_records(others, kind, rate=0.3, seed=1)[5:] == perturb_records(sentences[:10], kind,
                                                                                       rate=0.3, seed=1)[5:]


@pytest.mark.parametrize("kind", KINDS)
def test_ner_perturbations_keep_one_tag_per_token_in_valid_iob2(kind):
    records = read_conll(NCBI, max_rows=200)
    for record in perturb_records(records, kind, rate=0.3, seed=3):
        assert len(record["tokens"]) == len(record["tags"]) >= 1
        assert all(token and token == token.strip() for token in record["tokens"])
        for previous, tag in zip(["O", *record["tags"]], record["tags"], strict=False):
            assert not tag.startswith("I-") or previous[2:] == tag[2:], record


def test_pseudo_perplexity_matches_a_hand_computed_value(tiny_bert, abstracts):
    """Each scored token masked alone, predicted over the full vocabulary: exp(mean −log p), by hand."""
    model, tokenizer = tiny_bert
    model.eval()
    blocks = pack_blocks(tokenize_corpus(abstracts[:20], tokenizer, objective="mlm"), 16)[:3]
    special = set(tokenizer.all_special_ids)
    result = pseudo_perplexity(model, build_objective("mlm", tokenizer), blocks, special_ids=special,
                               mask_id=tokenizer.mask_token_id, max_tokens=30, batch_size=7,
                               device=torch.device("cpu"))
    scored = [(b, p) for b in range(len(blocks)) for p in range(blocks.shape[1])
              if int(blocks[b, p]) not in special][:30]
    nll = []
    with torch.no_grad():
        for b, p in scored:
            ids = blocks[b : b + 1].clone()
            ids[0, p] = tokenizer.mask_token_id
            nll.append(-float(model(input_ids=ids).logits[0, p].log_softmax(-1)[blocks[b, p]]))
    assert any(int(t) in special for t in blocks.flatten()), "the blocks hold special tokens to skip"
    assert result["tokens"] == 30
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
