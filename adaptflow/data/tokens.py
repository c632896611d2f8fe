"""The token store: each prepared corpus split tokenised once, kept as shards of token ids with document boundaries.

    store = TokenStore(root)                                  # a local folder or an s3:// prefix
    corpus = store.build(split, tokenizer, objective="mlm")   # tokenises what is not stored yet, then opens it

A split (the parquet file of texts `prepare_corpus` writes, in row groups) is planned into shards of consecutive
row groups holding about `shard_bytes` of text each. Every shard is tokenised on its own — in a build, one mapped
Prefect task per shard, so a Dask or Ray task runner spreads them over machines — and written as an Arrow IPC
stream holding one record batch with one column, `input_ids: list<int32>`, a document a row (framed by
`document_delimiters`). That is the file format Hugging Face `datasets` keeps its cache in
(`datasets.Dataset.from_file(shard)` opens one). A shard's sidecar `.json` (its counts) is written after it and the
store's `manifest.json` last, so a store with a manifest is complete and an interrupted build redoes only the
shards it had not finished. The key is (dataset digest, tokenizer digest, objective): a second build with the same
data and tokenizer tokenises nothing.

Reading memory-maps a shard (one on S3 is copied into a local cache of bounded size first): token ids and document
offsets are views of the file, never copies, so a corpus of any size costs only the pages a run reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adaptflow import storage
from adaptflow.data.corpus import digest_texts, iter_text_batches
from adaptflow.errors import ConfigError, DataError
from adaptflow.refs import DatasetRef, Record

SHARD_TEXT_BYTES = 128 << 20  # text per shard: ~30M tokens, ~120 MB of int32 ids
ENCODE_BATCH = 1000  # documents per call into the Rust tokenizer (which spreads a batch over its own threads)
SHARD_CACHE_BYTES = int(os.environ.get("ADAPTFLOW_SHARD_CACHE_BYTES", 8 << 30))  # local copies of S3 shards
MAX_OPEN_SHARDS = 32  # mapped at once per corpus (a shuffle window is 8)
FORMAT = 1


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def document_delimiters(tokenizer, objective: str) -> tuple[list[int], list[int]]:
    """Tokens framing each document: [CLS] … [SEP] for encoders, … <eos> for decoders."""
    if objective == "mlm":
        return [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    if tokenizer.eos_token_id is None:
        raise ConfigError("causal-LM packing needs a tokenizer with an eos token to separate documents")
    return [], [tokenizer.eos_token_id]


def store_key(dataset_digest: str, tokenizer, objective: str) -> str:
    return hashlib.sha256(f"{dataset_digest}|{tokenizer_digest(tokenizer)}|{objective}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class ShardTask(Record):
    """One unit of tokenisation: row groups [first, stop) of a split, written as shard `index` under `store`."""

    split_uri: str
    first: int
    stop: int
    index: int
    store: str  # the store's folder for this key (local or s3://)
    objective: str

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def encode_documents(texts: list[str], tokenizer, objective: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, document offsets) of `texts`, each document framed, none truncated (packing cuts them)."""
    head, tail = document_delimiters(tokenizer, objective)
    # The Rust backend directly: batched and parallel, and no per-document "too long" warnings.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    bodies = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
    body_lengths = np.fromiter((len(b) for b in bodies), dtype=np.int64, count=len(bodies))
    offsets = np.zeros(len(bodies) + 1, dtype=np.int64)
    np.cumsum(body_lengths + len(head) + len(tail), out=offsets[1:])
    ids = np.empty(offsets[-1], dtype=np.int32)
    if bodies:  # each body lands after its document's head; delimiters fill the rest
        starts = np.repeat(offsets[:-1] + len(head), body_lengths)
        within = np.arange(len(starts)) - np.repeat(np.cumsum(body_lengths) - body_lengths, body_lengths)
        ids[starts + within] = np.concatenate(bodies)
    for j, token in enumerate(head):
        ids[offsets[:-1] + j] = token
    for j, token in enumerate(tail):
        ids[offsets[1:] - len(tail) + j] = token
    return ids, offsets


def verify_split(split: DatasetRef) -> None:
    """Refuse a split whose content no longer matches its digest (read in batches: never the whole file)."""
    digest = digest_texts(text for texts in iter_text_batches(split.uri) for text in texts)
    if digest != split.digest:
        raise DataError(
            f"dataset {split.name or split.uri} at {split.uri} changed since it was prepared "
            f"(digest {digest}, expected {split.digest}); re-run prepare instead of editing prepared files"
        )


def plan_shards(split: DatasetRef, *, shard_bytes: int = SHARD_TEXT_BYTES) -> list[tuple[int, int]]:
    """Consecutive row-group ranges of `split` holding about `shard_bytes` of text each (a row group is never
    divided; at least one range, even for an empty split)."""
    with storage.open_input(split.uri, what="dataset file", random_access=True) as source:
        metadata = pq.ParquetFile(source).metadata
    ranges, first, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= shard_bytes:
            ranges.append((first, group + 1))
            first, size = group + 1, 0
    if first < metadata.num_row_groups or not ranges:
        ranges.append((first, metadata.num_row_groups))
    return ranges


def tokenize_shard(task: ShardTask, tokenizer) -> dict:
    """Tokenise one shard's texts and write it (and then its sidecar); a shard already written is kept."""
    shard_uri = storage.join(task.store, f"{task.name}.arrow")
    info_uri = storage.join(task.store, f"{task.name}.json")
    if storage.exists(info_uri):
        return json.loads(storage.read_bytes(info_uri))
    id_parts, offset_parts, base = [], [np.zeros(1, dtype=np.int64)], 0
    for texts in iter_text_batches(task.split_uri, first=task.first, stop=task.stop):
        ids, offsets = encode_documents(texts, tokenizer, task.objective)
        id_parts.append(ids)
        offset_parts.append(offsets[1:] + base)
        base += len(ids)
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate(offset_parts)
    if len(ids) >= 2**31:
        raise DataError(f"{task.split_uri}: row groups {task.first}..{task.stop} hold {len(ids)} tokens, more than "
                        "one shard can (2**31); write the split with smaller row groups")
    documents = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
    batch = pa.record_batch([documents], names=["input_ids"])
    with tempfile.TemporaryDirectory(prefix="adaptflow-shard-") as tmp:
        local = Path(tmp) / f"{task.name}.arrow"
        with pa.OSFile(str(local), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        info = {"file": local.name, "documents": len(offsets) - 1, "tokens": len(ids),
                "bytes": local.stat().st_size, "worker": f"{socket.gethostname()}:{os.getpid()}"}
        storage.put_file(local, shard_uri)
    storage.write_bytes_atomic(info_uri, json.dumps(info).encode())
    return info


class StoredCorpus:
    """An opened store: its shards' token ids and document offsets, memory-mapped on first use."""

    def __init__(self, uri: str, manifest: dict, cache: ShardCache | None):
        self.uri, self.manifest, self._cache = uri, manifest, cache
        self.shard_tokens = [s["tokens"] for s in manifest["shards"]]
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def documents(self) -> int:
        return self.manifest["documents"]

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, document offsets int32) of shard `index`: read-only views of the mapped file. At most
        `MAX_OPEN_SHARDS` stay mapped (the least recently used is let go), so the space of a shard the S3 cache
        dropped is given back."""
        with self._lock:
            if index in self._open:
                self._open[index] = self._open.pop(index)  # most recently used last
            else:
                self._open[index] = self._map(self.manifest["shards"][index])
                while len(self._open) > MAX_OPEN_SHARDS:
                    self._open.pop(next(iter(self._open)))
            return self._open[index]

    def _map(self, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        uri = storage.join(self.uri, shard["file"])
        path = self._cache.local(uri, f"{self.manifest['key']}/{shard['file']}", shard["bytes"]) \
            if storage.is_s3(uri) else uri
        try:
            batch = pa.ipc.open_stream(pa.memory_map(str(path))).read_next_batch()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"token store shard {uri} is unreadable ({exc}); delete {self.uri} to rebuild it") from exc
        documents = batch.column(0)
        return documents.values.to_numpy(zero_copy_only=True), documents.offsets.to_numpy(zero_copy_only=True)


class ShardCache:
    """Local copies of S3 shards, at most `max_bytes` together: the least recently used go first (a shard in use
    stays readable: its mapping outlives the file)."""

    def __init__(self, folder: str | Path, max_bytes: int = SHARD_CACHE_BYTES):
        self.folder, self.max_bytes = Path(folder), max_bytes

    def local(self, uri: str, name: str, size: int) -> Path:
        path = self.folder / name
        if path.is_file():
            os.utime(path)
            return path
        if size > self.max_bytes:
            raise ConfigError(f"shard {uri} ({size} bytes) is larger than the shard cache ({self.max_bytes} bytes); "
                              "raise ADAPTFLOW_SHARD_CACHE_BYTES")
        self._make_room(size)
        storage.get_file(uri, path, what="token store shard")
        return path

    def _make_room(self, size: int) -> None:
        files = sorted((p for p in self.folder.rglob("*.arrow") if p.is_file()), key=lambda p: p.stat().st_mtime)
        used = sum(p.stat().st_size for p in files)
        for oldest in files:
            if used + size <= self.max_bytes:
                break
            used -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


class TokenStore:
    """Tokenised corpora under `root` (a local folder or an s3:// prefix), one folder per key.
    `cache_dir`: where copies of S3 shards go (default: a folder beside the system's temporary files)."""

    def __init__(self, root: str | Path, *, cache_dir: str | Path | None = None,
                 shard_bytes: int = SHARD_TEXT_BYTES):
        self.root = str(root)
        self.shard_bytes = shard_bytes
        default_cache = Path(tempfile.gettempdir()) / "adaptflow-shard-cache"
        self.cache = ShardCache(cache_dir or default_cache) if storage.is_s3(self.root) else None

    def folder(self, key: str) -> str:
        return storage.join(self.root, key)

    def open(self, key: str) -> StoredCorpus | None:
        """The complete store under `key`, or None when there is none (no manifest yet)."""
        manifest_uri = storage.join(self.folder(key), "manifest.json")
        if not storage.exists(manifest_uri):
            return None
        manifest = json.loads(storage.read_bytes(manifest_uri, what="token store manifest"))
        if manifest.get("format") != FORMAT:
            return None
        return StoredCorpus(self.folder(key), manifest, self.cache)

    def plan(self, split: DatasetRef, tokenizer, objective: str) -> tuple[str, list[ShardTask]]:
        """The key of `split` under `tokenizer` and `objective`, and the shards still to tokenise (none when the
        store is complete)."""
        key = store_key(split.digest, tokenizer, objective)
        if self.open(key) is not None:
            return key, []
        verify_split(split)
        return key, [ShardTask(split_uri=split.uri, first=first, stop=stop, index=i, store=self.folder(key),
                               objective=objective)
                     for i, (first, stop) in enumerate(plan_shards(split, shard_bytes=self.shard_bytes))]

    def commit(self, key: str, split: DatasetRef, tokenizer, objective: str, shards: list[dict]) -> StoredCorpus:
        """Write the manifest of a store whose shards are all written: from now on it is complete."""
        documents = sum(s["documents"] for s in shards)
        if documents != split.rows:
            raise DataError(f"token store {self.folder(key)} holds {documents} documents but {split.name or split.uri} "
                            f"has {split.rows}; the split changed since it was prepared: re-run prepare")
        manifest = {"format": FORMAT, "key": key, "dataset": split.digest, "dataset_uri": split.uri,
                    "tokenizer": tokenizer_digest(tokenizer), "objective": objective, "shards": shards,
                    "documents": documents, "tokens": sum(s["tokens"] for s in shards)}
        storage.write_bytes_atomic(storage.join(self.folder(key), "manifest.json"),
                                   json.dumps(manifest, indent=1).encode())
        return StoredCorpus(self.folder(key), manifest, self.cache)

    def build(self, split: DatasetRef, tokenizer, objective: str) -> StoredCorpus:
        """The store of `split`, tokenising here the shards not written yet, one after another (each spread over
        the cores by the tokenizer itself; a build maps them as Prefect tasks instead: `plan`, then `commit`)."""
        key, tasks = self.plan(split, tokenizer, objective)
        if not tasks:
            return self.open(key)
        return self.commit(key, split, tokenizer, objective, [tokenize_shard(t, tokenizer) for t in tasks])
