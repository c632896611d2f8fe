"""Fixed-length training blocks read from the token store, in an order that depends only on (seed, epoch, position).

    blocks = PackedBlocks(corpus, block_size=128, isolate_documents=True)
    sampler = BlockSampler([(blocks, 0.9), (general, 0.1)], batch_size=16, seed=13)
    batch = sampler(i)          # micro-batch i: a PackedBatch of 16 blocks

Within a shard the documents follow one another and the stream is cut every `block_size` tokens (a shard's tail
shorter than a block is dropped), so no position is ever padding. A block keeps its document boundaries: with
`isolate_documents` each token carries the index of its document within the block, and the objectives turn that
into attention that never crosses a document (block-diagonal for masked LMs, block-causal for causal LMs) with
positions restarting at every document.

Order. Micro-batch i holds stream positions [i·B, (i+1)·B). Several corpora (domain text, general-text replay, or
several domains with mixing weights) are interleaved streams: position p goes to a stream by a closed form of p and
the weights alone (the first stream takes p iff ⌊(p+1)·w⌋ > ⌊p·w⌋, the rest recursively), so every window of
positions holds each stream at its ratio. A stream's k-th block is block `order(k // n)` at place k mod n of its
epoch: the shards in a seeded order, taken `window` shards at a time, the blocks of a window in a seeded order.
Nothing depends on the world size: rank r of W reads micro-batches r, r + W, … (the loop's split), so ranks read
disjoint blocks that together are every block once per epoch, a resumed run continues at exactly the next
micro-batch, and so does one resumed on another world size that keeps the global batch (world × accumulation ×
micro-batch): its step s starts at the same micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptflow.config.base import Section
from adaptflow.data.corpus import write_texts
from adaptflow.data.tokens import StoredCorpus, TokenStore
from adaptflow.errors import DataError

SHUFFLE_WINDOW = 8  # shards shuffled together: blocks mix across shards, while S3 reads stay local to a few
ISOLATE_BY_DEFAULT = {"clm": True, "mlm": False}


class Packing(Section):
    """How documents share a block. `isolate_documents`: attention and positions stay inside each document (null:
    the objective's default — on for causal LMs, where a document's first tokens would otherwise be predicted from
    the one before; off for masked LMs, see DESIGN.md for the measurement)."""

    isolate_documents: bool | None = None

    def isolates(self, objective: str) -> bool:
        return ISOLATE_BY_DEFAULT[objective] if self.isolate_documents is None else self.isolate_documents


@dataclass(frozen=True)
class PackedBatch:
    """Blocks of token ids and, when documents are isolated, each token's document index within its block."""

    input_ids: torch.Tensor  # [blocks, block_size] int64
    documents: torch.Tensor | None = None  # [blocks, block_size] int64, 0 for the block's first document

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, rows: slice) -> PackedBatch:
        return PackedBatch(self.input_ids[rows], None if self.documents is None else self.documents[rows])


class PackedBlocks:
    """A stored corpus as `block_size` blocks, read (memory-mapped) only when a block is asked for."""

    def __init__(self, corpus: StoredCorpus, block_size: int, *, isolate_documents: bool):
        self.corpus, self.block_size, self.isolate_documents = corpus, block_size, isolate_documents
        self.shard_blocks = np.array([tokens // block_size for tokens in corpus.shard_tokens], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_blocks)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def tokens(self) -> int:
        return len(self) * self.block_size

    def take(self, indices: np.ndarray) -> PackedBatch:
        """The blocks at global `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        ids = np.empty((len(indices), self.block_size), dtype=np.int64)
        documents = np.empty_like(ids) if self.isolate_documents else None
        span = np.arange(self.block_size)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            tokens, offsets = self.corpus.shard(int(shard))
            first = (indices[rows] - self.starts[shard]) * self.block_size
            positions = first[:, None] + span
            ids[rows] = tokens[positions]
            if documents is not None:  # each token's document, counted from the block's first
                doc = np.searchsorted(offsets, positions, side="right")
                documents[rows] = doc - doc[:, :1]
        return PackedBatch(torch.from_numpy(ids), None if documents is None else torch.from_numpy(documents))

    def head(self, n: int) -> PackedBatch:
        """The first `n` blocks (fewer if there are fewer): a fixed evaluation set."""
        return self.take(np.arange(min(n, len(self))))


class BlockOrder:
    """A permutation of a corpus's blocks per epoch, computed a window of shards at a time (never all at once)."""

    def __init__(self, blocks: PackedBlocks, seed: int, window: int = SHUFFLE_WINDOW):
        self.blocks, self.seed, self.window = blocks, seed, window
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, window shards, window starts
        self._window: tuple[int, int, np.ndarray] | None = None  # epoch, window index, its permuted blocks

    def __call__(self, epoch: int, places: np.ndarray) -> np.ndarray:
        _, windows, starts = self._epoch_plan(epoch)
        which = np.searchsorted(starts, places, side="right") - 1
        out = np.empty(len(places), dtype=np.int64)
        for w in np.unique(which):
            rows = np.flatnonzero(which == w)
            out[rows] = self._window_order(epoch, int(w), windows[w])[places[rows] - starts[w]]
        return out

    def _epoch_plan(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks.shard_blocks))
            windows = [shards[i : i + self.window] for i in range(0, len(shards), self.window)]
            sizes = [int(self.blocks.shard_blocks[w].sum()) for w in windows]
            self._epoch = (epoch, windows, np.concatenate([[0], np.cumsum(sizes)]))
        return self._epoch

    def _window_order(self, epoch: int, index: int, shards: np.ndarray) -> np.ndarray:
        if self._window is None or self._window[:2] != (epoch, index):
            members = np.concatenate([np.arange(self.blocks.starts[s], self.blocks.starts[s + 1]) for s in shards])
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            self._window = (epoch, index, members[rng.permutation(len(members))])
        return self._window[2]


def interleave(positions: np.ndarray, weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(stream, place in that stream) of each position of the mixed sequence: a closed form of the position and
    the weights, each stream at its ratio in every window of positions."""
    stream = np.full(len(positions), len(weights) - 1, dtype=np.int64)
    place = positions.astype(np.int64).copy()
    open_rows = np.arange(len(positions))
    rest = float(sum(weights))
    for s, weight in enumerate(weights[:-1]):
        share = weight / rest if rest > 0 else 0.0
        q = place[open_rows]
        taken_before, taken_through = np.floor(q * share), np.floor((q + 1) * share)
        mine = taken_through > taken_before
        stream[open_rows[mine]] = s
        place[open_rows[mine]] = taken_before[mine].astype(np.int64)
        place[open_rows[~mine]] = (q[~mine] - taken_through[~mine]).astype(np.int64)
        open_rows = open_rows[~mine]
        rest -= weight
    return stream, place


class BlockSampler:
    """Micro-batch `i` = the blocks at positions [i·B, (i+1)·B) of the interleaved streams (see the module's
    docstring). `streams` is (blocks, weight) pairs; the first one's epochs are the run's epochs."""

    def __init__(self, streams: list[tuple[PackedBlocks, float]], batch_size: int, seed: int, *,
                 window: int = SHUFFLE_WINDOW):
        streams = [(blocks, weight) for blocks, weight in streams if weight > 0]
        first = streams[0][0]
        if len(first) < batch_size:
            raise DataError(
                f"only {len(first)} training block(s) but batch_size is {batch_size}; "
                "use more data, a smaller block_size or a smaller batch_size"
            )
        for blocks, _ in streams[1:]:
            if len(blocks) == 0:
                raise DataError(f"a mixed-in corpus has fewer than {first.block_size} tokens: not one block")
        self.streams = [blocks for blocks, _ in streams]
        self.weights = [float(weight) for _, weight in streams]
        self.batch_size, self.seed = batch_size, seed
        self.orders = [BlockOrder(blocks, seed * 7919 + s, window) for s, blocks in enumerate(self.streams)]
        share = self.weights[0] / sum(self.weights)
        self.per_epoch = max(1, int(len(first) / share) // batch_size)  # micro-batches per epoch of the first

    def __call__(self, index: int) -> PackedBatch:
        return self.take(np.arange(index * self.batch_size, (index + 1) * self.batch_size))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream, block index in that stream) of each position."""
        stream, place = interleave(positions, self.weights)
        block = np.empty(len(positions), dtype=np.int64)
        for s in np.unique(stream):
            rows = np.flatnonzero(stream == s)
            epoch, within = np.divmod(place[rows], len(self.streams[s]))
            for e in np.unique(epoch):
                block[rows[epoch == e]] = self.orders[s](int(e), within[epoch == e])
        return stream, block

    def take(self, positions: np.ndarray) -> PackedBatch:
        stream, block = self.locate(positions)
        ids = torch.empty((len(positions), self.streams[0].block_size), dtype=torch.int64)
        documents = torch.empty_like(ids) if self.streams[0].isolate_documents else None
        for s in np.unique(stream):
            rows = torch.from_numpy(np.flatnonzero(stream == s))
            batch = self.streams[s].take(block[rows.numpy()])
            ids[rows] = batch.input_ids
            if documents is not None:
                documents[rows] = batch.documents
        return PackedBatch(ids, documents)



def pack_texts(texts: list[str], tokenizer, objective: str, block_size: int, *, datasets_dir, store: TokenStore,
               name: str = "texts", isolate_documents: bool | None = None) -> PackedBlocks:
    """Texts already in memory (a task's own text, a benchmark's documents) as blocks, by the one path every
    corpus takes: written as a content-addressed split under `datasets_dir`, tokenised into `store`."""
    split = write_texts(texts, name=name, split="train", out_dir=datasets_dir)
    isolate = ISOLATE_BY_DEFAULT[objective] if isolate_documents is None else isolate_documents
    return PackedBlocks(store.build(split, tokenizer, objective), block_size, isolate_documents=isolate)
