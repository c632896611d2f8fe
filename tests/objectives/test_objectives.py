"""Objectives: masks and losses are what they claim to be."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adaptflow.objectives import build_objective
from tests.conftest import pack_texts


def blocks_for(texts, tokenizer, objective, folder, block_size=32):
    return pack_texts(texts, tokenizer, objective, block_size, folder).head(1000)


def test_mlm_masks_fifteen_percent_of_non_special_tokens(abstracts, tiny_bert, tmp_path):
    _, tokenizer = tiny_bert
    objective = build_objective("mlm", tokenizer)
    blocks = blocks_for(abstracts, tokenizer, "mlm", tmp_path, 64)
    batch = objective.collate(blocks, torch.Generator().manual_seed(0))
    targets = batch["labels"] != -100
    special = torch.isin(blocks.input_ids, torch.tensor(tokenizer.all_special_ids))
    assert not (targets & special).any()
    rate = targets.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    replaced = batch["input_ids"][targets]
    share_mask = (replaced == tokenizer.mask_token_id).float().mean()
    assert 0.75 < share_mask < 0.85
    assert torch.equal(batch["labels"][targets], blocks.input_ids[targets])
    assert torch.equal(batch["input_ids"][~targets], blocks.input_ids[~targets])
    assert batch["n_targets"] == int(targets.sum())


def test_whole_word_masking_masks_every_piece_of_a_word(abstracts, tiny_bert, tmp_path):
    _, tokenizer = tiny_bert
    objective = build_objective("mlm", tokenizer, whole_word_masking=True)
    blocks = blocks_for(abstracts, tokenizer, "mlm", tmp_path, 64)
    targets = objective.collate(blocks, torch.Generator().manual_seed(1))["labels"] != -100
    continuation = objective.continuation[blocks.input_ids]
    assert continuation.any(), "the tiny vocabulary should split some words"
    # A continuation piece is a target exactly when the piece before it is.
    prev = targets[:, :-1]
    cont = continuation[:, 1:] & ~objective.special[blocks.input_ids[:, :-1]]
    assert torch.equal(targets[:, 1:][cont], prev[cont])


def test_mlm_loss_on_gathered_positions_equals_the_full_vocabulary_loss(abstracts, tiny_bert, tmp_path):
    model, tokenizer = tiny_bert
    model = copy.deepcopy(model).eval()
    objective = build_objective("mlm", tokenizer)
    batch = objective.collate(blocks_for(abstracts, tokenizer, "mlm", tmp_path)[:4], torch.Generator().manual_seed(0))
    ours = objective.loss(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum")
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


def test_clm_loss_sum_matches_transformers_mean_loss(abstracts, tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    model = copy.deepcopy(model).eval()
    objective = build_objective("clm", tokenizer)
    batch = objective.collate(blocks_for(abstracts, tokenizer, "clm", tmp_path)[:4], torch.Generator())
    ours = objective.loss(model, batch) / batch["n_targets"]
    reference = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
