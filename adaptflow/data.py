"""Corpus readers and dataset preparation: raw text files in, content-addressed parquet splits out.

``read_texts`` turns a corpus (txt/raw, JSON Lines, CSV or parquet; local or ``s3://``) into a list
of documents, failing with a ``DataError`` that names the file, line and fix for anything unusable.
``prepare_corpus`` dedupes, splits train/validation by a stable hash, and writes each split once to
``<out_dir>/<name>-<digest>/<split>.parquet``; ``load_texts`` reads a split back and checks its digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from adaptflow import storage
from adaptflow.errors import DataError
from adaptflow.refs import DatasetRef

FORMATS = ("txt", "jsonl", "csv", "parquet")
_SUFFIX_FORMATS = {
    ".txt": "txt",
    ".raw": "txt",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_DIGEST_CHARS = 16
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class PreparedCorpus:
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

    def to_dict(self) -> dict:
        return asdict(self)


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
    fmt = _resolve_format(uri, format)
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of documents, got {max_rows} (for {uri})")

    # Read the whole file up front: the returned list holds the text anyway, and it keeps storage
    # errors (retryable) apart from format errors (not retryable).
    data = storage.read_bytes(uri, what="corpus file")
    records = _records(uri, data, fmt, [text_field], string_fields=[text_field], fix=_text_field_fix)

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
    scores = [_unit_hash(seed, text) for text in texts]
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
    if not _SAFE_NAME.fullmatch(name):
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
    table = _parquet_table(ref.uri, data, ["text"], fix=_text_field_fix)
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


def _resolve_format(uri: str, format: str) -> str:
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"unknown corpus format {format!r} for {uri}: use one of auto, {', '.join(FORMATS)}")
        return format
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(
            f"cannot tell the format of {uri} from its suffix {suffix or '(none)'!r}: set format to one of "
            f"{', '.join(FORMATS)}"
        )
    return _SUFFIX_FORMATS[suffix]


def _decode_lines(uri: str, data: bytes) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` from UTF-8 bytes, 1-based, without line terminators."""
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{uri} line {number}: not valid UTF-8 at byte offset {offset + exc.start} "
                f"({exc.reason}); re-encode the file as UTF-8"
            ) from exc
        if number == 1:
            line = line.removeprefix("\ufeff")
        offset += len(raw) + 1
        yield number, line.removesuffix("\r")


def _text_field_fix(field: str) -> str:
    return "set text_field to the one holding the text"


def _records(
    uri: str,
    data: bytes,
    fmt: str,
    fields: Sequence[str],
    *,
    optional: Sequence[str] = (),
    string_fields: Sequence[str] = (),
    fix: Callable[[str], str],
) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for each record of a file in format ``fmt``; ``where`` is "line N" or "row N".

    Each record holds every name in ``fields`` and those names in ``optional`` that the file has. A record
    (or file) lacking one of ``fields`` is a ``DataError`` that lists what is present and ends with
    ``fix(missing_field)``. ``txt`` yields each line under ``fields[0]``; CSV values are all strings;
    parquet columns named in ``string_fields`` must have a string type.
    """
    if fmt == "txt":
        for number, line in _decode_lines(uri, data):
            yield f"line {number}", {fields[0]: line}
    elif fmt == "jsonl":
        yield from _jsonl_records(uri, data, fields, optional, fix)
    elif fmt == "csv":
        yield from _csv_records(uri, data, fields, optional, fix)
    else:
        yield from _parquet_records(uri, data, fields, optional, string_fields, fix)


def _jsonl_records(
    uri: str, data: bytes, fields: Sequence[str], optional: Sequence[str], fix: Callable[[str], str]
) -> Iterator[tuple[str, dict]]:
    wanted = list(dict.fromkeys([*fields, *optional]))
    for number, line in _decode_lines(uri, data):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = "each line must be one JSON object"
            if number == 1 and line.lstrip().startswith("["):
                hint = "this looks like a JSON array; write JSON Lines instead (one object per line)"
            raise DataError(f"{uri} line {number}: malformed JSON ({exc}); {hint}") from exc
        if not isinstance(record, dict):
            raise DataError(
                f"{uri} line {number}: expected a JSON object, got {type(record).__name__}; "
                "each line must be one JSON object"
            )
        for field in fields:
            if field not in record:
                raise DataError(
                    f"{uri} line {number}: no field {field!r}; fields present: {', '.join(record) or '(none)'} "
                    f"({fix(field)})"
                )
        yield f"line {number}", {field: record[field] for field in wanted if field in record}


def _csv_records(
    uri: str, data: bytes, fields: Sequence[str], optional: Sequence[str], fix: Callable[[str], str]
) -> Iterator[tuple[str, dict]]:
    # Validate UTF-8 ourselves: pyarrow's error names neither line nor offset.
    for _ in _decode_lines(uri, data):
        pass
    if not data.strip():
        return
    wanted = list(dict.fromkeys([*fields, *optional]))
    # CSV has no types: keep every field read as a string, so a document like "1984" or a label like
    # "007" stays as written.
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={field: pa.string() for field in wanted}),
        )
    except pa.ArrowException as exc:
        raise DataError(f"{uri}: malformed CSV ({exc}); check quoting and the column count of each row") from exc
    _require_columns(uri, table.column_names, fields, fix)
    present = [field for field in wanted if field in table.column_names]
    for row, record in enumerate(table.select(present).to_pylist(), start=1):
        yield f"row {row}", record


def _parquet_records(
    uri: str,
    data: bytes,
    fields: Sequence[str],
    optional: Sequence[str],
    string_fields: Sequence[str],
    fix: Callable[[str], str],
) -> Iterator[tuple[str, dict]]:
    table = _parquet_table(uri, data, fields, optional=optional, fix=fix)
    string_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    for field in string_fields:
        column_type = table.schema.field(field).type
        if not any(is_string(column_type) for is_string in string_types):
            raise DataError(f"{uri}: column {field!r} has type {column_type}, expected string ({fix(field)})")
    for row, record in enumerate(table.to_pylist(), start=1):
        yield f"row {row}", record


def _parquet_table(
    uri: str,
    data: bytes,
    columns: Sequence[str] | None = None,
    *,
    optional: Sequence[str] = (),
    fix: Callable[[str], str] = _text_field_fix,
) -> pa.Table:
    """Read ``columns`` (all when None) plus whichever of ``optional`` exist from parquet bytes."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        names = parquet.schema_arrow.names
        if columns is None:
            return parquet.read()
        _require_columns(uri, names, columns, fix)
        wanted = dict.fromkeys([*columns, *(name for name in optional if name in names)])
        return parquet.read(columns=list(wanted))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{uri}: not a readable parquet file ({exc}); it may be truncated or corrupt, re-export it"
        ) from exc


def _require_columns(uri: str, present: Sequence[str], required: Sequence[str], fix: Callable[[str], str]) -> None:
    for column in required:
        if column not in present:
            raise DataError(
                f"{uri}: no column {column!r}; columns present: {', '.join(present) or '(none)'} ({fix(column)})"
            )


def stable_sample(keys: list[str], size: int, seed: int) -> list[int]:
    """Indices (in input order) of `size` of `keys` chosen by a hash of ``(seed, key)``: a representative
    sample even of a file sorted by label, and the same one every time."""
    if size >= len(keys):
        return list(range(len(keys)))
    # Salted, so the sample is independent of split_train_validation's hash of the same (seed, key).
    return sorted(sorted(range(len(keys)), key=lambda i: _unit_hash(seed, f"sample\0{keys[i]}"))[:size])


def _unit_hash(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def write_texts(texts: list[str], *, name: str, split: str, out_dir: str | Path) -> DatasetRef:
    """Write `texts` as `<out_dir>/<name>-<digest>/<split>.parquet` (one column `text`; reused when there)."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    return _write_split_table(table, digest_texts(texts), name=name, split=split, out_dir=out_dir)


def _write_split_table(table: pa.Table, digest: str, *, name: str, split: str, out_dir: str | Path) -> DatasetRef:
    """Write ``table`` to ``<out_dir>/<name>-<digest>/<split>.parquet`` unless that file already exists."""
    uri = storage.join(out_dir, f"{name}-{digest}", f"{split}.parquet")
    if not storage.exists(uri):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    return DatasetRef(uri=uri, digest=digest, rows=table.num_rows, name=f"{name}/{split}")
