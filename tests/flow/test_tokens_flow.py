"""Tokenisation as mapped Prefect tasks: the same store from a thread pool or a Dask cluster of processes."""

from __future__ import annotations

import os

import pytest

from adaptflow.config.sections import TokensConfig
from adaptflow.data import formats
from adaptflow.data.corpus import write_texts
from adaptflow.data.tokens import TokenStore
from adaptflow.models import save_checkpoint
from adaptflow.tasks.tokens import task_runner, tokenize_splits


@pytest.fixture
def checkpoint(tiny_bert, tmp_path):
    model, tokenizer = tiny_bert
    save_checkpoint(model, tokenizer, tmp_path / "base", lineage={})
    return str(tmp_path / "base")


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_shards_are_tokenised_as_mapped_tasks_on_any_task_runner(runner, abstracts, tiny_bert, checkpoint, tmp_path,
                                                                 monkeypatch, prefect_server):
    monkeypatch.setattr(formats, "ROW_GROUP_BYTES", 8_000)
    split = write_texts(abstracts, name="texts", split="train", out_dir=tmp_path / "datasets")
    root = str(tmp_path / "tokens")
    store = TokenStore(root, shard_bytes=30_000)
    flow = tokenize_splits.with_options(task_runner=task_runner(TokensConfig(runner=runner, workers=2)))
    [key] = flow(root, [split], checkpoint, "mlm", shard_bytes=30_000)

    corpus = store.open(key)
    reference = TokenStore(tmp_path / "reference", shard_bytes=30_000).build(split, tiny_bert[1], "mlm")
    assert len(corpus.manifest["shards"]) == len(reference.manifest["shards"]) > 1
    for ours, theirs in zip(corpus.manifest["shards"], reference.manifest["shards"], strict=True):
        assert {k: v for k, v in ours.items() if k != "worker"} == {k: v for k, v in theirs.items() if k != "worker"}
    workers = {shard["worker"] for shard in corpus.manifest["shards"]}
    here = f"{os.uname().nodename}:{os.getpid()}"
    if runner == "dask":  # tokenised in the cluster's worker processes, not here
        assert here not in workers and len(workers) >= 1
    else:
        assert workers == {here}
    assert flow(root, [split], checkpoint, "mlm", shard_bytes=30_000) == [key]  # a second run finds the store complete
