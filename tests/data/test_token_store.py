"""The token store and the streamed blocks: tokenised once, read per rank in a deterministic order, documents kept
apart when asked."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptflow.data import formats, tokens
from adaptflow.data.blocks import BlockSampler, PackedBlocks, interleave
from adaptflow.data.corpus import write_texts
from adaptflow.data.tokens import TokenStore
from adaptflow.errors import DataError
from adaptflow.objectives import build_objective
from adaptflow.objectives.packing import lm_inputs
from tests.conftest import pack_texts


@pytest.fixture
def small_row_groups(monkeypatch):
    monkeypatch.setattr(formats, "ROW_GROUP_BYTES", 8_000)  # a 300-abstract split becomes ~20 row groups


@pytest.fixture
def sentences(abstracts) -> list[str]:
    """Short documents: several share every 32-token block."""
    return [s.strip() for text in abstracts[:40] for s in text.split(". ") if len(s.split()) > 3]


def split_of(texts, folder):
    return write_texts(texts, name="texts", split="train", out_dir=folder / "datasets")


def test_shards_hold_every_document_framed_and_blocks_waste_no_position(abstracts, tiny_bert, tmp_path,
                                                                          small_row_groups):
    _, tokenizer = tiny_bert
    split = split_of(abstracts, tmp_path)
    corpus = TokenStore(tmp_path / "tokens", shard_bytes=30_000).build(split, tokenizer, "mlm")
    assert len(corpus.manifest["shards"]) > 3 and corpus.documents == len(abstracts)
    stream = []
    for i in range(len(corpus.manifest["shards"])):
        ids, offsets = corpus.shard(i)
        assert not ids.flags.writeable, "a shard is a read-only view of the mapped file, not a copy"
        assert (ids[offsets[:-1]] == tokenizer.cls_token_id).all() and (ids[offsets[1:] - 1] == tokenizer.sep_token_id).all()
        stream.append(ids)
    expected = tokenizer(abstracts[0], add_special_tokens=True)["input_ids"]
    assert stream[0][: len(expected)].tolist() == expected
    blocks = PackedBlocks(corpus, 64, isolate_documents=False)
    assert len(blocks) == sum(len(ids) // 64 for ids in stream)
    whole = blocks.take(np.arange(len(blocks))).input_ids
    assert torch.equal(whole.flatten(), torch.from_numpy(np.concatenate([ids[: len(ids) // 64 * 64] for ids in stream])).long())


def test_a_shard_opens_with_hugging_face_datasets(abstracts, tiny_bert, tmp_path):
    import datasets
    corpus = TokenStore(tmp_path / "tokens").build(split_of(abstracts[:20], tmp_path), tiny_bert[1], "mlm")
    shard = datasets.Dataset.from_file(str(tmp_path / "tokens" / corpus.manifest["key"] / "shard-00000.arrow"))
    assert len(shard) == 20 and shard[3]["input_ids"] == corpus.shard(0)[0][corpus.shard(0)[1][3]:corpus.shard(0)[1][4]].tolist()


def test_a_second_build_tokenises_nothing_and_an_interrupted_one_only_what_it_missed(abstracts, tiny_bert, tmp_path,
                                                                                     small_row_groups, monkeypatch):
    _, tokenizer = tiny_bert
    split = split_of(abstracts, tmp_path)
    store = TokenStore(tmp_path / "tokens", shard_bytes=30_000)
    first = store.build(split, tokenizer, "mlm")
    encoded = []
    real = tokens.encode_documents
    monkeypatch.setattr(tokens, "encode_documents", lambda texts, *a: encoded.extend(texts) or real(texts, *a))
    again = store.build(split, tokenizer, "mlm")
    assert encoded == [] and again.manifest == first.manifest

    folder = tmp_path / "tokens" / first.manifest["key"]
    (folder / "manifest.json").unlink()
    (folder / "shard-00002.json").unlink()  # as if the build died while writing shard 2
    rebuilt = store.build(split, tokenizer, "mlm")
    assert rebuilt.manifest == first.manifest
    assert len(encoded) == first.manifest["shards"][2]["documents"], "only the unfinished shard is tokenised again"


def test_the_key_is_data_tokenizer_and_objective_and_a_changed_split_is_refused(abstracts, tiny_bert, tiny_gpt2,
                                                                               tmp_path):
    store = TokenStore(tmp_path / "tokens")
    split = split_of(abstracts[:10], tmp_path)
    keys = {store.build(split, tiny_bert[1], "mlm").manifest["key"], store.build(split, tiny_gpt2[1], "clm").manifest["key"],
            store.build(split_of(abstracts[:11], tmp_path), tiny_bert[1], "mlm").manifest["key"]}
    assert len(keys) == 3
    edited = split_of(abstracts[20:30], tmp_path / "other")
    tampered = type(split)(uri=edited.uri, digest=split.digest, rows=split.rows, name="texts/train")
    with pytest.raises(DataError, match="changed since it was prepared"):
        TokenStore(tmp_path / "fresh").build(tampered, tiny_bert[1], "mlm")


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])
def test_an_isolated_document_is_untouched_by_a_change_to_its_neighbour(architecture, sentences, tiny_bert,
                                                                        tiny_gpt2, tmp_path):
    model, tokenizer = copy.deepcopy(tiny_bert if architecture == "bert" else tiny_gpt2)
    model.eval()
    objective = "mlm" if architecture == "bert" else "clm"
    blocks = pack_texts(sentences, tokenizer, objective, 32, tmp_path, isolate=True)
    batch = next(b for i in range(len(blocks)) if len((b := blocks.take([i])).documents.unique()) >= 3)
    documents = batch.documents[0]
    edited = int(documents.bincount().argmax())  # the block's longest document is changed, another one read
    first, last = documents == edited, documents == (edited + 1) % (int(documents.max()) + 1)
    changed = batch.input_ids.clone()
    changed[0, first.nonzero()[1:-1, 0]] = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("protein"))[0]

    def outputs(ids, isolate=True):
        packed = {"input_ids": ids, "documents": batch.documents} if isolate else {"input_ids": ids}
        with torch.no_grad():
            return model(**lm_inputs(model, packed, causal=objective == "clm")).logits[0]

    assert not torch.equal(outputs(changed)[first], outputs(batch.input_ids)[first])
    assert torch.equal(outputs(changed)[last], outputs(batch.input_ids)[last]), "attention crossed a document"
    assert not torch.equal(outputs(changed, False)[last], outputs(batch.input_ids, False)[last]), \
        "without isolation the documents should see each other (else this test proves nothing)"

    lm = build_objective(objective, tokenizer)
    g = torch.Generator().manual_seed(0)
    collated = lm.collate(batch, g)
    if objective == "clm":  # a document's first token is no target: nothing of its own precedes it
        starts = (documents[1:] != documents[:-1]).nonzero()[:, 0]
        assert (collated["labels"][0, starts] == -100).all()
        assert collated["n_targets"] == 31 - len(starts)
        # positions restart at every document
    from adaptflow.objectives.packing import document_positions
    positions = document_positions(batch.documents)[0]
    assert (positions[documents != torch.roll(documents, 1)] == 0).all() and positions[0] == 0


def test_ranks_read_disjoint_blocks_that_together_are_the_epoch(abstracts, tiny_bert, tmp_path, small_row_groups):
    blocks = pack_texts(abstracts, tiny_bert[1], "mlm", 32, tmp_path, shard_bytes=30_000)
    sampler = BlockSampler([(blocks, 1.0)], 4, seed=5, window=2)
    world, steps = 2, len(blocks) // (4 * 2)
    read = {rank: np.concatenate([sampler.locate(np.arange((i * world + rank) * 4, (i * world + rank + 1) * 4))[1]
                                  for i in range(steps)]) for rank in range(world)}
    assert not set(read[0]) & set(read[1])
    epoch = np.concatenate([read[0], read[1]])
    assert len(set(epoch)) == len(epoch) == steps * world * 4 and len(blocks) - len(epoch) < world * 4
    # the order is a function of (seed, epoch, position): a fresh sampler agrees, another seed does not
    again = BlockSampler([(blocks, 1.0)], 4, seed=5, window=2)
    assert torch.equal(again(7).input_ids, sampler(7).input_ids)
    assert not torch.equal(BlockSampler([(blocks, 1.0)], 4, seed=6, window=2)(7).input_ids, sampler(7).input_ids)
    # the next epoch is another permutation of the same blocks
    n = len(blocks)
    second = sampler.locate(np.arange(n, 2 * n))[1]
    assert sorted(second) == list(range(n)) and list(second) != list(sampler.locate(np.arange(n))[1])


def test_a_window_of_shards_is_read_before_the_next(abstracts, tiny_bert, tmp_path, small_row_groups):
    blocks = pack_texts(abstracts, tiny_bert[1], "mlm", 32, tmp_path, shard_bytes=30_000)
    assert len(blocks.shard_blocks) >= 6
    sampler = BlockSampler([(blocks, 1.0)], 4, seed=1, window=2)
    _, order = sampler.locate(np.arange(len(blocks)))
    shard_of = np.searchsorted(blocks.starts, order, side="right") - 1
    first_window = blocks.shard_blocks[shard_of[0]] + blocks.shard_blocks[
        next(s for s in shard_of if s != shard_of[0])]
    assert len(set(shard_of[:first_window])) == 2 and set(shard_of[:first_window]).isdisjoint(shard_of[first_window:])


def test_mixed_streams_hold_their_ratio_in_every_window():
    positions = np.arange(10_000)
    stream, place = interleave(positions, [0.7, 0.2, 0.1])
    for end in (10, 97, 1000, 10_000):
        counts = np.bincount(stream[:end], minlength=3)
        assert abs(counts[0] - 0.7 * end) <= 1 and abs(counts[1] - 0.2 * end) <= 1.5 and abs(counts[2] - 0.1 * end) <= 2
    for s in range(3):  # each stream's places are 0, 1, 2, … in order: no block skipped or repeated
        assert (place[stream == s] == np.arange((stream == s).sum())).all()


def test_replay_is_a_second_stream_at_its_ratio(abstracts, tiny_bert, tmp_path):
    domain = pack_texts(abstracts[:60], tiny_bert[1], "mlm", 32, tmp_path / "d")
    general = pack_texts(abstracts[60:], tiny_bert[1], "mlm", 32, tmp_path / "g")
    sampler = BlockSampler([(domain, 0.9), (general, 0.1)], 10, seed=0)
    stream, _ = sampler.locate(np.arange(1000))
    assert (stream == 1).sum() == 100 and all((stream[i:i + 10] == 1).sum() == 1 for i in range(0, 1000, 10))
    assert sampler.per_epoch == len(domain) * 10 // 9 // 10


def test_shards_on_s3_stream_through_a_bounded_local_cache(abstracts, tiny_bert, tmp_path, s3_env, small_row_groups):
    _, tokenizer = tiny_bert
    split = split_of(abstracts, tmp_path)
    local = TokenStore(tmp_path / "tokens", shard_bytes=30_000).build(split, tokenizer, "mlm")
    largest = max(s["bytes"] for s in local.manifest["shards"])
    remote = TokenStore(f"s3://{s3_env}/tokens", cache_dir=tmp_path / "cache", shard_bytes=30_000)
    remote.cache.max_bytes = 2 * largest
    corpus = remote.build(split, tokenizer, "mlm")
    assert corpus.manifest["shards"] == local.manifest["shards"]
    ours, theirs = PackedBlocks(corpus, 32, isolate_documents=True), PackedBlocks(local, 32, isolate_documents=True)
    every = np.arange(len(ours))
    a, b = ours.take(every), theirs.take(every)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.documents, b.documents)
    cached = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.arrow"))
    assert 0 < cached <= 2 * largest
