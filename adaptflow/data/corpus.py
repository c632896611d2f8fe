"""Corpus readers and dataset preparation: raw text files in, content-addressed parquet splits out — streamed, so
a corpus of any size passes through in bounded memory.

``iter_texts`` streams the documents of a corpus — one file (txt/raw, JSON Lines, CSV or parquet) or a folder /
``s3://`` prefix of them — failing with a ``DataError`` that names the file, line and fix for anything unusable
(``read_texts`` is the same as a list, for small inputs). ``prepare_corpus`` dedupes exactly (`SeenDigests`: 8
bytes per distinct document, the one thing that grows with the corpus), splits train/validation by a stable hash
and writes each split once, in row groups, to ``<out_dir>/<name>-<digest>/<split>.parquet``. ``iter_text_batches``
streams a split back; ``load_texts`` reads a small one whole and checks its digest.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adaptflow import storage
from adaptflow.data import formats
from adaptflow.data.formats import SAFE_NAME, resolve_format, text_field_fix, write_split_table
from adaptflow.errors import DataError
from adaptflow.refs import DatasetRef, Record

_DIGEST_CHARS = 16


@dataclass(frozen=True)
class PreparedCorpus(Record):
    """What ``prepare_corpus`` produced.

    ``train``/``validation`` point at the written parquet splits. ``documents_read`` counts
    non-empty documents read from ``source_uri`` (after ``max_documents``), before
    ``duplicates_removed`` exact duplicates were dropped, so
    ``train.rows + validation.rows == documents_read - duplicates_removed``.
    """

    train: DatasetRef
    validation: DatasetRef
    source_uri: str
    documents_read: int
    duplicates_removed: int


def iter_texts(uri: str | Path, *, format: str = "auto", text_field: str = "text") -> Iterator[str]:
    """Stream the documents of a corpus, stripped of surrounding whitespace, empties dropped, in order.

    ``uri`` is one file, or a folder (an ``s3://`` prefix ending in "/") whose files are read in name order
    (names starting with "." or "_" skipped). Formats: ``txt`` (one document per line; also wikitext-style
    ``.raw``), ``jsonl`` (one JSON object per line, text in ``text_field``), ``csv`` (header row, text in column
    ``text_field``) and ``parquet`` (string column ``text_field``). ``auto`` picks by each file's suffix:
    ``.txt``/``.raw``, ``.jsonl``/``.json``, ``.csv``, ``.parquet``/``.pq``.

    Raises ``DataError`` naming the file (and line or row where it applies) when it is missing, undecodable as
    UTF-8, malformed, lacks ``text_field`` or holds a non-string text; ``storage.StorageUnavailable`` when S3
    cannot be reached. (No documents at all is the caller's to judge.)
    """
    uri = str(uri)
    files = storage.list_files(uri) if storage.is_directory(uri) else [uri]
    if not files:
        raise DataError(f"corpus folder {uri} holds no files (names starting with '.' or '_' are skipped)")
    for file in files:
        fmt = resolve_format(file, format)
        for where, record in formats.records(file, None, fmt, [text_field], string_fields=[text_field],
                                             fix=text_field_fix, what="corpus file"):
            value = record[text_field]
            if not isinstance(value, str):
                shown = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
                raise DataError(
                    f"{file} {where}: field {text_field!r} must be a string, got {shown} "
                    "(fix or drop that record, or set text_field to the field holding the text)"
                )
            if text := value.strip():
                yield text


def read_texts(
    uri: str | Path,
    *,
    format: str = "auto",
    text_field: str = "text",
    max_rows: int | None = None,
) -> list[str]:
    """The documents of a corpus as a list (`iter_texts`), the first ``max_rows`` non-empty ones when given; a
    ``DataError`` when there are none."""
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of documents, got {max_rows} (for {uri})")
    texts = list(itertools.islice(iter_texts(uri, format=format, text_field=text_field), max_rows))
    if not texts:
        raise DataError(_no_documents(uri, format, text_field))
    return texts


def _no_documents(uri, format: str, text_field: str) -> str:
    return (f"{uri} contains no non-empty documents (check the file, and format={format!r} / "
            f"text_field={text_field!r})")


def digest_texts(texts: Iterable[str]) -> str:
    """Content digest of an ordered sequence of texts: 16 hex chars of a SHA-256.

    Each text is framed as its UTF-8 byte length (8 bytes, big-endian) followed by its bytes, so
    ``["ab", "c"]`` and ``["a", "bc"]`` differ. Order matters; an empty sequence has a digest too.
    """
    h = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "big"))
        h.update(encoded)
    return h.hexdigest()[:_DIGEST_CHARS]


def dedupe_exact(texts: Iterable[str]) -> tuple[list[str], int]:
    """Drop exact duplicates (compared after stripping whitespace), keeping first occurrences in order.

    Returns ``(kept, removed_count)``; kept texts are returned as given, not stripped.
    """
    texts = list(texts)
    kept = [text for text, new in zip(texts, SeenDigests().new(texts), strict=True) if new]
    return kept, len(texts) - len(kept)


class SeenDigests:
    """Which documents were seen, for exact de-duplication at any scale: a 64-bit BLAKE2b digest of each distinct
    (stripped) text, kept in sorted numpy runs merged like a binary counter — 8 bytes per distinct document (plus
    a merge's transient copy), checked a batch at a time. Two different texts share a digest with probability
    about n²/2⁶⁵ (1 in 40,000 for 30 million documents): one document dropped."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self.runs)

    def new(self, texts: list[str]) -> list[bool]:
        """Whether each text is seen here for the first time (earlier in `texts` counts); records them all."""
        digests = np.fromiter((int.from_bytes(hashlib.blake2b(t.strip().encode(), digest_size=8).digest(), "little")
                               for t in texts), dtype=np.uint64, count=len(texts))
        first = np.zeros(len(texts), dtype=bool)
        first[np.unique(digests, return_index=True)[1]] = True
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            first &= run[at] != digests
        fresh = np.sort(digests[first])
        while self.runs and len(self.runs[-1]) <= len(fresh):  # merge equal-sized runs: O(log n) runs
            fresh = np.union1d(self.runs.pop(), fresh)
        if len(fresh):
            self.runs.append(fresh)
        return first.tolist()


class HashSplit:
    """The train/validation rule, one document at a time: a document goes to validation when a hash of
    ``(seed, text)`` falls below ``validation_fraction``, so the assignment depends only on the document itself
    (adding or removing others never moves it; identical texts land together). Tiny corpora get a fix
    (`correction`): train keeps at least one document, and with ``validation_fraction > 0`` and two or more
    documents validation gets at least one — the document with the lowest / highest hash moves."""

    def __init__(self, validation_fraction: float, seed: int):
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.fraction, self.seed = validation_fraction, seed
        self.counts = {"train": 0, "validation": 0}
        self._lowest_train: tuple[float, int] | None = None  # (hash, index within train)
        self._highest_validation: tuple[float, int] | None = None

    def assign(self, text: str) -> str:
        score = unit_hash(self.seed, text)
        split = "validation" if score < self.fraction else "train"
        index = self.counts[split]
        self.counts[split] += 1
        if split == "train" and (self._lowest_train is None or score < self._lowest_train[0]):
            self._lowest_train = (score, index)
        if split == "validation" and (self._highest_validation is None or score > self._highest_validation[0]):
            self._highest_validation = (score, index)
        return split

    def correction(self) -> tuple[str, int, str] | None:
        """(split, index in it, split it moves to) for the one document a tiny corpus moves, or None."""
        train, validation = self.counts["train"], self.counts["validation"]
        if self.fraction > 0 and train + validation >= 2 and validation == 0:
            return "train", self._lowest_train[1], "validation"
        if validation and train == 0:
            return "validation", self._highest_validation[1], "train"
        return None


def split_train_validation(
    texts: Iterable[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split texts into ``(train, validation)`` by `HashSplit`, preserving input order within each."""
    rule = HashSplit(validation_fraction, seed)
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for text in texts:
        splits[rule.assign(text)].append(text)
    if (move := rule.correction()) is not None:
        source, index, target = move
        splits[target].append(splits[source].pop(index))
    return splits["train"], splits["validation"]


def prepare_corpus(
    uri: str | Path,
    *,
    name: str,
    out_dir: str | Path,
    format: str = "auto",
    text_field: str = "text",
    validation_fraction: float = 0.05,
    seed: int = 0,
    max_documents: int | None = None,
) -> PreparedCorpus:
    """Read, dedupe and split a corpus (a file, or a folder or ``s3://`` prefix of files: `iter_texts`) as a
    stream, and write each split as a parquet file with one column ``text``. Memory stays flat but for the
    exact-duplicate digests (`SeenDigests`, 8 bytes per distinct document).

    Each split goes to ``<out_dir>/<name>-<digest>/<split>.parquet`` where ``digest`` is
    ``digest_texts`` of that split, so the location names the content: a file already there is
    reused, not rewritten, and re-running on unchanged input is a no-op. Writes are atomic (temp
    file + rename locally, single upload on S3). ``out_dir`` may be local or ``s3://``; returned
    URIs are absolute paths or ``s3://`` URIs, and ref names are ``<name>/train`` and
    ``<name>/validation``.

    Raises ``DataError`` for unusable input (see ``iter_texts``), ``ValueError`` for a ``name``
    that is not a plain file-name component or a ``validation_fraction`` outside [0, 1).
    """
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(
            f"corpus name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a directory name)"
        )
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction} (corpus {name})")

    read = removed = 0
    seen, rule = SeenDigests(), HashSplit(validation_fraction, seed)
    writers = {split: _SplitWriter(name, split, out_dir) for split in ("train", "validation")}
    try:
        documents = itertools.islice(iter_texts(uri, format=format, text_field=text_field), max_documents)
        while batch := list(itertools.islice(documents, 4096)):
            read += len(batch)
            for text, new in zip(batch, seen.new(batch), strict=True):
                if new:
                    writers[rule.assign(text)].add(text)
                else:
                    removed += 1
        if not read:
            raise DataError(_no_documents(uri, format, text_field))
        if (move := rule.correction()) is not None:
            source, index, target = move
            writers[target].add(writers[source].drop(index))
        refs = {split: writer.finish() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.discard()
    return PreparedCorpus(
        train=refs["train"],
        validation=refs["validation"],
        source_uri=str(uri),
        documents_read=read,
        duplicates_removed=removed,
    )


class _SplitWriter:
    """One split of `prepare_corpus`, written as it is read: a local parquet file (row groups of
    `formats.ROW_GROUP_BYTES`) and a running digest, placed at `<out_dir>/<name>-<digest>/<split>.parquet` at the
    end (left alone when already there: the location names the content)."""

    SCHEMA = pa.schema([("text", pa.string())])

    def __init__(self, name: str, split: str, out_dir):
        self.name, self.split, self.out_dir = name, split, out_dir
        folder = Path(out_dir) if not storage.is_s3(out_dir) else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)  # beside the target, so the final rename is atomic
        fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}-{split}.", suffix=".parquet.tmp")
        os.close(fd)
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        self.writer = pq.ParquetWriter(self.path, self.SCHEMA)
        self.digest, self.rows, self.buffer, self.buffered = hashlib.sha256(), 0, [], 0

    def add(self, text: str) -> None:
        encoded = text.encode("utf-8")
        self.digest.update(len(encoded).to_bytes(8, "big"))
        self.digest.update(encoded)
        self.buffer.append(text)
        self.rows += 1
        self.buffered += len(encoded)
        if self.buffered >= formats.ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.table({"text": pa.array(self.buffer, type=pa.string())}, schema=self.SCHEMA))
            self.buffer, self.buffered = [], 0

    def drop(self, index: int) -> str:
        """Take document `index` out (a tiny corpus's correction): the split is rewritten without it."""
        self._flush()
        self.writer.close()
        texts = [t for batch in iter_text_batches(str(self.path)) for t in batch]
        self._open()
        for i, text in enumerate(texts):
            if i != index:
                self.add(text)
        return texts[index]

    def finish(self) -> DatasetRef:
        self._flush()
        self.writer.close()
        digest = self.digest.hexdigest()[:_DIGEST_CHARS]
        uri = storage.join(self.out_dir, f"{self.name}-{digest}", f"{self.split}.parquet")
        if not storage.exists(uri):
            if storage.is_s3(uri):
                storage.put_file(self.path, uri)
            else:
                try:
                    Path(uri).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.path, uri)
                except OSError as exc:
                    raise DataError(f"cannot write {uri}: {exc} (check permissions and free space)") from exc
        return DatasetRef(uri=uri, digest=digest, rows=self.rows, name=f"{self.name}/{self.split}")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def iter_text_batches(uri: str, *, first: int = 0, stop: int | None = None, rows: int = 1000) -> Iterator[list[str]]:
    """The texts of row groups [first, stop) of a prepared split, `rows` at a time: never the whole file."""
    with storage.open_input(uri, what="dataset file", random_access=True) as source:
        try:
            parquet = pq.ParquetFile(source)
            groups = list(range(first, parquet.num_row_groups if stop is None else stop))
            for batch in parquet.iter_batches(batch_size=rows, row_groups=groups, columns=["text"]):
                yield batch.column(0).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"dataset file {uri} is unreadable ({exc}); re-run prepare") from exc


def load_texts(ref: DatasetRef) -> list[str]:
    """Read back the texts of a split written by ``prepare_corpus``, in order.

    Raises ``DataError`` if the file is missing or unreadable, or if its content no longer
    matches ``ref.digest`` (the file changed since it was prepared).
    """
    texts = [text for batch in iter_text_batches(ref.uri) for text in batch]
    if any(not isinstance(t, str) for t in texts):
        raise DataError(f"dataset {ref.name or ref.uri} at {ref.uri} has null or non-string texts; re-run prepare")
    digest = digest_texts(texts)
    if digest != ref.digest:
        raise DataError(
            f"dataset {ref.name or ref.uri} at {ref.uri} changed since it was prepared "
            f"(digest {digest}, expected {ref.digest}); re-run prepare_corpus instead of editing prepared files"
        )
    return texts


def stable_sample(keys: list[str], size: int, seed: int) -> list[int]:
    """Indices (in input order) of `size` of `keys` chosen by a hash of ``(seed, key)``: a representative
    sample even of a file sorted by label, and the same one every time."""
    if size >= len(keys):
        return list(range(len(keys)))
    # Salted, so the sample is independent of split_train_validation's hash of the same (seed, key).
    return sorted(sorted(range(len(keys)), key=lambda i: unit_hash(seed, f"sample\0{keys[i]}"))[:size])


def unit_hash(seed: int, text: str) -> float:
    """A number in [0, 1) from (seed, text): where a document or record falls in a hash-based split."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def write_texts(texts: list[str], *, name: str, split: str, out_dir: str | Path) -> DatasetRef:
    """Write `texts` as `<out_dir>/<name>-<digest>/<split>.parquet` (one column `text`; reused when there)."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    return write_split_table(table, digest_texts(texts), name=name, split=split, out_dir=out_dir)


