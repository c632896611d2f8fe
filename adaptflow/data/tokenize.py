"""Tokenisation (batched, cached on disk) and packing of documents into fixed-length blocks."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptflow.errors import ConfigError


@dataclass(frozen=True)
class TokenizedCorpus:
    """Every document's token ids, concatenated (`ids`) with document boundaries (`offsets`, len = docs + 1)."""

    ids: np.ndarray
    offsets: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def document_delimiters(tokenizer, objective: str) -> tuple[list[int], list[int]]:
    """Tokens framing each document: [CLS] … [SEP] for encoders, … <eos> for decoders."""
    if objective == "mlm":
        return [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    if tokenizer.eos_token_id is None:
        raise ConfigError("causal-LM packing needs a tokenizer with an eos token to separate documents")
    return [], [tokenizer.eos_token_id]


def tokenize_corpus(
    texts: list[str],
    tokenizer,
    *,
    objective: str,
    cache_dir: str | Path | None = None,
    dataset_digest: str | None = None,
    batch_size: int = 1000,
) -> TokenizedCorpus:
    """Tokenise whole documents (no truncation: packing splits them), framed by `document_delimiters`.

    With `cache_dir` and `dataset_digest`, the result is stored under a key of (dataset digest, tokenizer,
    objective) and reused by every later stage or build that reads the same data with the same tokenizer.
    """
    cache_file = None
    if cache_dir is not None and dataset_digest is not None:
        key = hashlib.sha256(f"{dataset_digest}|{tokenizer_digest(tokenizer)}|{objective}".encode()).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"{key}.npz"
        if cache_file.is_file():
            with np.load(cache_file, allow_pickle=False) as data:
                return TokenizedCorpus(ids=data["ids"], offsets=data["offsets"])

    head, tail = document_delimiters(tokenizer, objective)
    backend = tokenizer.backend_tokenizer
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(0, len(texts), batch_size):
        # The Rust backend directly: batched and parallel, and no per-document "too long" warnings.
        for enc in backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False):
            doc = np.asarray(head + enc.ids + tail, dtype=np.int32)
            chunks.append(doc)
            lengths.append(len(doc))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    corpus = TokenizedCorpus(ids=ids, offsets=offsets)

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, ids=ids, offsets=offsets)
        os.replace(tmp, cache_file)
    return corpus


def pack_blocks(corpus: TokenizedCorpus, block_size: int) -> torch.Tensor:
    """Concatenate all documents and cut the stream into [n_blocks, block_size] blocks; drop the tail.

    No position is ever padding, so all compute goes to real tokens. Attention crosses document
    boundaries inside a block (the documents are delimited by [SEP]/<eos>), as in RoBERTa's FULL-SENTENCES.
    """
    n_blocks = corpus.tokens // block_size
    return torch.from_numpy(corpus.ids[: n_blocks * block_size].astype(np.int64)).view(n_blocks, block_size)


def mix_replay(domain: torch.Tensor, general: torch.Tensor, ratio: float, *, seed: int) -> torch.Tensor:
    """Domain blocks plus general blocks such that `ratio` of the result is general text (sampled with seed)."""
    if ratio <= 0 or len(general) == 0:
        return domain
    wanted = round(ratio / (1 - ratio) * len(domain))
    g = torch.Generator().manual_seed(seed)
    if wanted <= len(general):
        picked = torch.randperm(len(general), generator=g)[:wanted]
    else:
        picked = torch.randint(len(general), (wanted,), generator=g)
    return torch.cat([domain, general[picked]])
