"""Corpus readers and dataset preparation: raw text files in, content-addressed parquet splits out.

``read_texts`` turns a corpus (txt/raw, JSON Lines, CSV or parquet; local or ``s3://``) into a list
of documents, failing with a ``DataError`` that names the file, line and fix for anything unusable.
``prepare_corpus`` dedupes, splits train/validation by a stable hash, and writes each split once to
``<out_dir>/<name>-<digest>/<split>.parquet``; ``load_texts`` reads a split back and checks its digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from adaptflow import storage
from adaptflow.data import formats
from adaptflow.data.formats import SAFE_NAME, parquet_table, resolve_format, text_field_fix, write_split_table
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


def read_texts(
    uri: str | Path,
    *,
    format: str = "auto",
    text_field: str = "text",
    max_rows: int | None = None,
) -> list[str]:
    """Read the documents of a corpus file, stripped of surrounding whitespace, empties dropped.

    Formats: ``txt`` (one document per line; also wikitext-style ``.raw``), ``jsonl`` (one JSON
    object per line, text in ``text_field``), ``csv`` (header row, text in column ``text_field``)
    and ``parquet`` (string column ``text_field``). ``auto`` picks by suffix: ``.txt``/``.raw``,
    ``.jsonl``/``.json``, ``.csv``, ``.parquet``/``.pq``. ``max_rows`` keeps the first N non-empty
    documents in file order.

    Raises ``DataError`` naming the file (and line or row where it applies) when the file is
    missing, undecodable as UTF-8, malformed, lacks ``text_field``, holds a non-string text, or
    has no non-empty documents; ``storage.StorageUnavailable`` when S3 cannot be reached.
    """
    uri = str(uri)
    fmt = resolve_format(uri, format)
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of documents, got {max_rows} (for {uri})")

    # Read the whole file up front: the returned list holds the text anyway, and it keeps storage
    # errors (retryable) apart from format errors (not retryable).
    data = storage.read_bytes(uri, what="corpus file")
    records = formats.records(uri, data, fmt, [text_field], string_fields=[text_field], fix=text_field_fix)

    texts: list[str] = []
    for where, record in records:
        value = record[text_field]
        if not isinstance(value, str):
            shown = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
            raise DataError(
                f"{uri} {where}: field {text_field!r} must be a string, got {shown} "
                "(fix or drop that record, or set text_field to the field holding the text)"
            )
        text = value.strip()
        if text:
            texts.append(text)
            if max_rows is not None and len(texts) >= max_rows:
                break
    if not texts:
        raise DataError(
            f"{uri} contains no non-empty documents (check the file, and format={fmt!r} / "
            f"text_field={text_field!r})"
        )
    return texts


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
    seen: set[str] = set()
    kept: list[str] = []
    removed = 0
    for text in texts:
        key = text.strip()
        if key in seen:
            removed += 1
            continue
        seen.add(key)
        kept.append(text)
    return kept, removed


def split_train_validation(
    texts: Iterable[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split texts into ``(train, validation)``, preserving input order within each.

    A document goes to validation when a hash of ``(seed, text)`` falls below
    ``validation_fraction``, so the assignment depends only on the document itself: adding or
    removing other documents never moves it, and identical texts always land together. Train always
    keeps at least one document, and when ``validation_fraction > 0`` and there are at least two
    documents validation gets at least one (the documents with the highest / lowest hash are moved,
    which only matters for tiny corpora). ``validation_fraction == 0`` gives an empty validation split.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    texts = list(texts)
    scores = [unit_hash(seed, text) for text in texts]
    in_validation = [score < validation_fraction for score in scores]

    if validation_fraction > 0 and len(texts) >= 2 and not any(in_validation):
        in_validation[min(range(len(texts)), key=scores.__getitem__)] = True
    if texts and all(in_validation):
        in_validation[max(range(len(texts)), key=scores.__getitem__)] = False

    train = [t for t, v in zip(texts, in_validation, strict=True) if not v]
    validation = [t for t, v in zip(texts, in_validation, strict=True) if v]
    return train, validation


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
    """Read, dedupe and split a corpus, and write each split as a parquet file with one column ``text``.

    Each split goes to ``<out_dir>/<name>-<digest>/<split>.parquet`` where ``digest`` is
    ``digest_texts`` of that split, so the location names the content: a file already there is
    reused, not rewritten, and re-running on unchanged input is a no-op. Writes are atomic (temp
    file + rename locally, single upload on S3). ``out_dir`` may be local or ``s3://``; returned
    URIs are absolute paths or ``s3://`` URIs, and ref names are ``<name>/train`` and
    ``<name>/validation``.

    Raises ``DataError`` for unusable input (see ``read_texts``), ``ValueError`` for a ``name``
    that is not a plain file-name component or a ``validation_fraction`` outside [0, 1).
    """
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(
            f"corpus name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a directory name)"
        )
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction} (corpus {name})")

    texts = read_texts(uri, format=format, text_field=text_field, max_rows=max_documents)
    unique, removed = dedupe_exact(texts)
    train, validation = split_train_validation(unique, validation_fraction, seed)
    refs = {
        split: write_texts(split_texts, name=name, split=split, out_dir=out_dir)
        for split, split_texts in (("train", train), ("validation", validation))
    }
    return PreparedCorpus(
        train=refs["train"],
        validation=refs["validation"],
        source_uri=str(uri),
        documents_read=len(texts),
        duplicates_removed=removed,
    )


def load_texts(ref: DatasetRef) -> list[str]:
    """Read back the texts of a split written by ``prepare_corpus``, in order.

    Raises ``DataError`` if the file is missing or unreadable, or if its content no longer
    matches ``ref.digest`` (the file changed since it was prepared).
    """
    data = storage.read_bytes(ref.uri, what="dataset file")
    table = parquet_table(ref.uri, data, ["text"], fix=text_field_fix)
    texts = table.column("text").to_pylist()
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


