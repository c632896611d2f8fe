"""File formats: reading JSON Lines, CSV, parquet and plain-text files record by record, and writing a prepared
split once, content-addressed. Every problem is a `DataError` naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
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
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a dataset name: it becomes a directory name
ROW_GROUP_BYTES = 1 << 20  # of a written split: what the token store shards by and readers stream
CHUNK_BYTES = 16 << 20  # read at a time when a file is streamed


def resolve_format(uri: str, format: str) -> str:
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


def decode_lines(uri: str, data: bytes | None = None, *, what: str = "file") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of UTF-8 text, 1-based, without line terminators: from ``data``, or streamed
    from ``uri`` a chunk at a time when ``data`` is None (never the whole file in memory)."""
    offset = number = 0
    with _stream(uri, data, what=what) as stream:
        tail = b""
        while chunk := stream.read(CHUNK_BYTES):
            *lines, tail = (tail + chunk).split(b"\n")
            for raw in lines:
                number += 1
                yield number, _decode(uri, raw, number, offset)
                offset += len(raw) + 1
        yield number + 1, _decode(uri, tail, number + 1, offset)


def _decode(uri: str, raw: bytes, number: int, offset: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{uri} line {number}: not valid UTF-8 at byte offset {offset + exc.start} "
            f"({exc.reason}); re-encode the file as UTF-8"
        ) from exc
    if number == 1:
        line = line.removeprefix("\ufeff")
    return line.removesuffix("\r")


def _stream(uri: str, data: bytes | None, *, what: str = "file", random_access: bool = False):
    return pa.BufferReader(data) if data is not None else storage.open_input(uri, what=what,
                                                                             random_access=random_access)


def text_field_fix(field: str) -> str:
    return "set text_field to the one holding the text"


def records(
    uri: str,
    data: bytes | None,
    fmt: str,
    fields: Sequence[str],
    *,
    optional: Sequence[str] = (),
    string_fields: Sequence[str] = (),
    fix: Callable[[str], str],
    what: str = "file",
) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for each record of a file in format ``fmt``; ``where`` is "line N" or "row N".
    ``data`` is the file's content, or None to stream it from ``uri`` (a chunk, CSV block or parquet batch at a
    time: a file of any size).

    Each record holds every name in ``fields`` and those names in ``optional`` that the file has. A record
    (or file) lacking one of ``fields`` is a ``DataError`` that lists what is present and ends with
    ``fix(missing_field)``. ``txt`` yields each line under ``fields[0]``; CSV values are all strings;
    parquet columns named in ``string_fields`` must have a string type.
    """
    if fmt == "txt":
        for number, line in decode_lines(uri, data, what=what):
            yield f"line {number}", {fields[0]: line}
    elif fmt == "jsonl":
        yield from _jsonl_records(uri, data, fields, optional, fix, what)
    elif fmt == "csv":
        yield from _csv_records(uri, data, fields, optional, fix, what)
    else:
        yield from _parquet_records(uri, data, fields, optional, string_fields, fix, what)


def _jsonl_records(
    uri: str, data: bytes | None, fields: Sequence[str], optional: Sequence[str], fix: Callable[[str], str],
    what: str = "file",
) -> Iterator[tuple[str, dict]]:
    wanted = list(dict.fromkeys([*fields, *optional]))
    for number, line in decode_lines(uri, data, what=what):
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
    uri: str, data: bytes | None, fields: Sequence[str], optional: Sequence[str], fix: Callable[[str], str],
    what: str = "file",
) -> Iterator[tuple[str, dict]]:
    # Validate UTF-8 ourselves first (a streamed pass): pyarrow's error names neither line nor offset.
    if not any([line.strip() for _, line in decode_lines(uri, data, what=what)]):
        return
    wanted = list(dict.fromkeys([*fields, *optional]))
    # CSV has no types: keep every field read as a string, so a document like "1984" or a label like
    # "007" stays as written.
    try:
        with _stream(uri, data, what=what) as stream:
            reader = pacsv.open_csv(
                stream,
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={field: pa.string() for field in wanted}),
            )
            _require_columns(uri, reader.schema.names, fields, fix)
            present = [field for field in wanted if field in reader.schema.names]
            row = 0
            for batch in reader:
                for record in batch.select(present).to_pylist():
                    row += 1
                    yield f"row {row}", record
    except pa.ArrowException as exc:
        raise DataError(f"{uri}: malformed CSV ({exc}); check quoting and the column count of each row") from exc


def _parquet_records(
    uri: str,
    data: bytes | None,
    fields: Sequence[str],
    optional: Sequence[str],
    string_fields: Sequence[str],
    fix: Callable[[str], str],
    what: str = "file",
) -> Iterator[tuple[str, dict]]:
    string_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    with _stream(uri, data, what=what, random_access=True) as source:
        try:
            parquet = pq.ParquetFile(source)
            schema = parquet.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{uri}: not a readable parquet file ({exc}); it may be truncated or corrupt, re-export it"
            ) from exc
        _require_columns(uri, schema.names, fields, fix)
        for field in string_fields:
            column_type = schema.field(field).type
            if not any(is_string(column_type) for is_string in string_types):
                raise DataError(f"{uri}: column {field!r} has type {column_type}, expected string ({fix(field)})")
        wanted = list(dict.fromkeys([*fields, *(name for name in optional if name in schema.names)]))
        row = 0
        try:
            for batch in parquet.iter_batches(columns=wanted):
                for record in batch.to_pylist():
                    row += 1
                    yield f"row {row}", record
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{uri}: not a readable parquet file ({exc}); it may be truncated or corrupt, re-export it"
            ) from exc


def parquet_table(
    uri: str,
    data: bytes,
    columns: Sequence[str] | None = None,
    *,
    optional: Sequence[str] = (),
    fix: Callable[[str], str] = text_field_fix,
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



def write_split_table(table: pa.Table, digest: str, *, name: str, split: str, out_dir: str | Path) -> DatasetRef:
    """Write ``table`` to ``<out_dir>/<name>-<digest>/<split>.parquet`` unless that file already exists."""
    uri = storage.join(out_dir, f"{name}-{digest}", f"{split}.parquet")
    if not storage.exists(uri):
        sink = pa.BufferOutputStream()
        rows = max(1, int(ROW_GROUP_BYTES * table.num_rows / max(table.nbytes, 1)))
        pq.write_table(table, sink, row_group_size=rows)
        storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    return DatasetRef(uri=uri, digest=digest, rows=table.num_rows, name=f"{name}/{split}")

