"""Objectives, tokenisation and packing: masks, losses and blocks are what they claim to be."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adaptflow.data.tokenize import mix_replay, pack_blocks, tokenize_corpus
from adaptflow.objectives import build_objective


def blocks_for(texts, tokenizer, objective, block_size=32):
    return pack_blocks(tokenize_corpus(texts, tokenizer, objective=objective), block_size)


def test_packing_frames_documents_and_wastes_no_position(abstracts, tiny_bert):
    _, tokenizer = tiny_bert
    corpus = tokenize_corpus(abstracts[:10], tokenizer, objective="mlm")
    assert corpus.documents == 10
    starts = corpus.ids[corpus.offsets[:-1]]
    ends = corpus.ids[corpus.offsets[1:] - 1]
    assert (starts == tokenizer.cls_token_id).all() and (ends == tokenizer.sep_token_id).all()
    blocks = pack_blocks(corpus, 64)
    assert blocks.shape == (corpus.tokens // 64, 64)
    assert not (blocks == tokenizer.pad_token_id).any()
    assert torch.equal(blocks.flatten(), torch.from_numpy(corpus.ids[: blocks.numel()]).long())


def test_tokenisation_is_cached_by_dataset_and_tokenizer(abstracts, tiny_bert, tmp_path):
    _, tokenizer = tiny_bert
    first = tokenize_corpus(abstracts[:5], tokenizer, objective="mlm", cache_dir=tmp_path, dataset_digest="d1")
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # Same digest → read from the cache, even if (hypothetically) the texts passed differ.
    again = tokenize_corpus(["other"], tokenizer, objective="mlm", cache_dir=tmp_path, dataset_digest="d1")
    assert (again.ids == first.ids).all()
    tokenize_corpus(abstracts[:6], tokenizer, objective="mlm", cache_dir=tmp_path, dataset_digest="d2")
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_replay_mixes_the_requested_share_of_general_blocks():
    domain = torch.zeros(90, 8, dtype=torch.long)
    general = torch.ones(500, 8, dtype=torch.long)
    mixed = mix_replay(domain, general, 0.1, seed=0)
    assert len(mixed) == 100 and int(mixed[:, 0].sum()) == 10
    assert torch.equal(mix_replay(domain, general, 0.0, seed=0), domain)
    assert len(mix_replay(domain, general[:3], 0.5, seed=0)) == 180  # sampled with replacement when short


def test_mlm_masks_fifteen_percent_of_non_special_tokens(abstracts, tiny_bert):
    _, tokenizer = tiny_bert
    objective = build_objective("mlm", tokenizer)
    blocks = blocks_for(abstracts, tokenizer, "mlm", 64)
    batch = objective.collate(blocks, torch.Generator().manual_seed(0))
    targets = batch["labels"] != -100
    special = torch.isin(blocks, torch.tensor(tokenizer.all_special_ids))
    assert not (targets & special).any()
    rate = targets.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    replaced = batch["input_ids"][targets]
    share_mask = (replaced == tokenizer.mask_token_id).float().mean()
    assert 0.75 < share_mask < 0.85
    assert torch.equal(batch["labels"][targets], blocks[targets])
    assert torch.equal(batch["input_ids"][~targets], blocks[~targets])
    assert batch["n_targets"] == int(targets.sum())


def test_whole_word_masking_masks_every_piece_of_a_word(abstracts, tiny_bert):
    _, tokenizer = tiny_bert
    objective = build_objective("mlm", tokenizer, whole_word_masking=True)
    blocks = blocks_for(abstracts, tokenizer, "mlm", 64)
    targets = objective.collate(blocks, torch.Generator().manual_seed(1))["labels"] != -100
    continuation = objective.continuation[blocks]
    assert continuation.any(), "the tiny vocabulary should split some words"
    # A continuation piece is a target exactly when the piece before it is.
    prev = targets[:, :-1]
    cont = continuation[:, 1:] & ~objective.special[blocks[:, :-1]]
    assert torch.equal(targets[:, 1:][cont], prev[cont])


def test_mlm_loss_on_gathered_positions_equals_the_full_vocabulary_loss(abstracts, tiny_bert):
    model, tokenizer = tiny_bert
    model = copy.deepcopy(model).eval()
    objective = build_objective("mlm", tokenizer)
    batch = objective.collate(blocks_for(abstracts, tokenizer, "mlm")[:4], torch.Generator().manual_seed(0))
    ours = objective.loss(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum")
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


def test_clm_loss_sum_matches_transformers_mean_loss(abstracts, tiny_gpt2):
    model, tokenizer = tiny_gpt2
    model = copy.deepcopy(model).eval()
    objective = build_objective("clm", tokenizer)
    batch = objective.collate(blocks_for(abstracts, tokenizer, "clm")[:4], torch.Generator())
    ours = objective.loss(model, batch) / batch["n_targets"]
    reference = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
