"""Labelled task data: classification, NER and SFT records in, content-addressed parquet splits out.

``prepare_task`` reads the train/validation/test files a ``TaskDataConfig`` names (JSON Lines, CSV or
parquet records; CoNLL-style IOB2 files for NER), checks every label against the label set, drops exact
duplicates from train, holds out validation by a stable hash when none is given, and writes each split once
to ``<out_dir>/<name>-<digest>/<split>.parquet``. ``load_records`` reads a split back and checks its digest.
Bad input raises a ``DataError`` naming the file, line and fix before anything is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa

from adaptflow import kinds, storage
from adaptflow.config.sections import TaskDataConfig
from adaptflow.data.corpus import digest_texts, split_train_validation, stable_sample, unit_hash
from adaptflow.data.formats import SAFE_NAME, decode_lines, parquet_table, records, resolve_format, write_split_table
from adaptflow.errors import DataError
from adaptflow.refs import DatasetRef, Record

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_CONLL_SUFFIXES = (".txt", ".conll", ".tsv", ".iob")
_IOB2_TAG = re.compile(r"O|[BI]-\S+")

# An example is a normalised record plus where it came from ("<uri> line 12"), kept until the
# splits are checked so that a bad label can be traced to its file and line.
Example = tuple[str, dict]


@dataclass(frozen=True)
class TaskSplits(Record):
    """Prepared splits of one labelled task.

    ``labels`` are the class names in id order (classification), the IOB2 tag set in id order (ner:
    ``"O"`` first, then sorted, unless the recipe lists them), or ``()`` for sft. ``validation`` is None
    only when there is no validation data at all (none given and ``validation_fraction`` 0, or train
    too small to hold any out); ``test`` is None when none was given.
    """

    kind: str
    train: DatasetRef
    validation: DatasetRef | None
    test: DatasetRef | None
    labels: tuple[str, ...]


def read_records(
    uri: str | Path,
    *,
    fields: list[str],
    format: str = "auto",
    optional: tuple[str, ...] = (),
    max_rows: int | None = None,
) -> list[dict]:
    """Read the records of a JSON Lines, CSV or parquet file, keeping ``fields`` and those of ``optional`` present.

    Values are kept as they are in the file (a JSONL label may be an int; CSV values are all strings).
    ``format`` is ``auto`` (by suffix, as in ``data.read_texts``), ``jsonl``, ``csv`` or ``parquet``;
    ``max_rows`` keeps the first N records.

    Raises ``DataError`` naming the file (and line or row) when it is missing, not UTF-8, malformed,
    lacks one of ``fields`` (listing the fields it has), is plain text, or holds no records.
    """
    examples = _read_records(str(uri), fields, format=format, optional=optional, max_rows=max_rows)
    return [record for _, record in examples]


def read_conll(
    uri: str | Path, *, token_column: int = 0, tag_column: int = -1, max_rows: int | None = None
) -> list[dict]:
    """Read a CoNLL-style IOB2 file into ``[{"tokens": [...], "tags": [...]}, ...]``, one dict per sentence.

    One token per line, columns separated by tabs (or by whitespace on a line without a tab), a blank
    line between sentences; ``-DOCSTART-`` lines are skipped. ``token_column``/``tag_column`` index the
    columns (negative counts from the end). ``max_rows`` keeps the first N sentences.

    Raises ``DataError`` naming the file and 1-based line for a line whose column count differs from the
    file's first token line, a tag that is not ``O``/``B-X``/``I-X``, bytes that are not UTF-8, a column
    index out of range, or a file without sentences.
    """
    return [sentence for _, sentence in _read_conll(str(uri), token_column, tag_column, max_rows)]


def prepare_task(name: str, config: TaskDataConfig, *, out_dir: str | Path, seed: int = 0) -> TaskSplits:
    """Read, check, dedupe and split the labelled task ``name``, and write each split as parquet.

    Columns: classification ``text``, ``text_pair`` (only when ``text_pair_field`` is set), ``label``
    (string: a label is ``str`` of its value, so JSONL ``0``/``1`` become ``"0"``/``"1"``); ner ``tokens``
    and ``tags`` (lists of strings); sft ``prompt`` and ``response``.

    Each split's paths are read in order and concatenated; ``max_examples`` then keeps a sample of that
    many, chosen by a hash of ``(seed, record)`` and kept in file order (files are often sorted by label,
    so the first N would be one class).
    Exact duplicate records are dropped from train only. Without ``validation``, ``validation_fraction``
    of train is held out by a hash of ``(seed, record)``, so (tiny sets aside) a record's side never
    depends on the other records.
    Labels are ``config.labels`` when given (every label in every split must be listed), otherwise those
    of train, sorted (ner: ``"O"`` first); a validation/test label never seen in train is an error then.

    Everything is checked before anything is written. Each split then goes to
    ``<out_dir>/<name>-<digest>/<split>.parquet`` (``digest``: 16 hex of a SHA-256 over the split's
    canonical JSON records), atomically and only if not already there. ``out_dir`` may be ``s3://``.

    Raises ``DataError`` for unusable data, ``ValueError`` for a ``name`` that is not a plain file name.
    """
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a directory name)")
    read = _example_reader(name, config)
    splits: dict[str, list[Example] | None] = {}
    for split in SPLITS:
        paths = getattr(config, split)
        splits[split] = None if paths is None else _read_split(read, paths, config.max_examples, seed)

    train = _dedupe(splits["train"])
    if len(train) < len(splits["train"]):
        log.info("tasks.%s: dropped %d exact duplicate records from train", name, len(splits["train"]) - len(train))
    splits["train"] = train
    # Labels come from the whole of train, before any hold-out, so a rare class that lands only in the
    # held-out validation split is still a known label rather than an error.
    labels = _check_labels(name, config, splits)
    validation_held = 0.0
    if splits["validation"] is None:
        splits["train"], held_out = _hold_out(train, config.validation_fraction, seed)
        splits["validation"] = held_out or None
        validation_held = config.validation_fraction
    if splits["test"] is None and config.test_fraction:
        # The same hash as the validation hold-out: validation below its fraction, test the next slice.
        upper = validation_held + config.test_fraction
        sides: dict[bool, list[Example]] = {True: [], False: []}
        for example in splits["train"]:
            sides[unit_hash(seed, _canonical(example[1])) < upper].append(example)
        if not sides[False]:
            raise DataError(f"task {name!r}: test_fraction {config.test_fraction:g} leaves nothing of its "
                            f"{len(splits['train'])} training records to train on; lower it or give a test file")
        splits["train"], splits["test"] = sides[False], sides[True] or None

    refs = {
        split: None if examples is None else _write(name, split, config, [record for _, record in examples], out_dir)
        for split, examples in splits.items()
    }
    return TaskSplits(kind=config.type, labels=labels, **refs)


def load_records(ref: DatasetRef) -> list[dict]:
    """Read back the records of a split written by ``prepare_task``, in order.

    Raises ``DataError`` if the file is missing or unreadable, or if its content no longer matches
    ``ref.digest`` (the file changed since it was prepared).
    """
    data = storage.read_bytes(ref.uri, what="dataset file")
    records = parquet_table(ref.uri, data).to_pylist()
    digest = _digest(records)
    if digest != ref.digest:
        raise DataError(
            f"dataset {ref.name or ref.uri} at {ref.uri} changed since it was prepared "
            f"(digest {digest}, expected {ref.digest}); re-run prepare_task instead of editing prepared files"
        )
    return records


def label_counts(records: Iterable[dict], kind: str) -> dict[str, int]:
    """How often each label occurs (ner: each tag, over all tokens), most frequent first; ``{}`` for sft."""
    labels_of = kinds.get(kind).labels_of
    counts = Counter(label for record in records for label in labels_of(record))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _read_records(
    uri: str,
    fields: list[str],
    *,
    format: str,
    optional: tuple[str, ...] = (),
    max_rows: int | None = None,
    string_fields: tuple[str, ...] = (),
    fix: Callable[[str], str] = lambda field: "fix the file, or set the task's field names to fields it has",
) -> list[Example]:
    fmt = resolve_format(uri, format)
    if fmt == "txt":
        raise DataError(
            f"{uri}: labelled records need named fields, which a plain text file does not have; "
            "write JSON Lines, CSV or parquet (or set format if the suffix is misleading)"
        )
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of records, got {max_rows} (for {uri})")
    data = storage.read_bytes(uri, what="data file")
    found = records(uri, data, fmt, fields, optional=optional, string_fields=string_fields, fix=fix)
    examples = [(f"{uri} {where}", record) for where, record in itertools.islice(found, max_rows)]
    if not examples:
        raise DataError(f"{uri} contains no records (check the file, and format={fmt!r})")
    return examples


def _read_conll(uri: str, token_column: int, tag_column: int, max_rows: int | None) -> list[Example]:
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of sentences, got {max_rows} (for {uri})")
    data = storage.read_bytes(uri, what="data file")
    sentences = itertools.islice(_conll_sentences(uri, data, token_column, tag_column), max_rows)
    examples = [(f"{uri} line {line}", sentence) for line, sentence in sentences]
    if not examples:
        raise DataError(
            f"{uri} contains no sentences (expected one token per line, a blank line between sentences)"
        )
    return examples


def _conll_sentences(uri: str, data: bytes, token_column: int, tag_column: int) -> Iterator[tuple[int, dict]]:
    """Yield ``(first_line, {"tokens", "tags"})`` per sentence."""
    width = first_line = None
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in decode_lines(uri, data):
        columns = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or columns[0] == "-DOCSTART-":
            if tokens:
                yield start, {"tokens": tokens, "tags": tags}
                tokens, tags = [], []
            continue
        if width is None:
            width, first_line = len(columns), number
            for setting, index in (("token_column", token_column), ("tag_column", tag_column)):
                if not -width <= index < width:
                    raise DataError(
                        f"{uri} line {number}: {setting} {index} is out of range for a line of {width} columns; "
                        f"set {setting} to a column between 0 and {width - 1} (or -1 for the last)"
                    )
        elif len(columns) != width:
            raise DataError(
                f"{uri} line {number}: expected {width} columns, found {len(columns)} (line {first_line}, the "
                "first token line, sets the count); fix that line's separators or add the missing column"
            )
        tag = columns[tag_column].strip()
        if not _IOB2_TAG.fullmatch(tag):
            raise DataError(
                f"{uri} line {number}: tag {tag!r} is not IOB2 (expected O, B-<type> or I-<type>); fix the tag, "
                f"or set tag_column (now {tag_column}) to the column that holds the tags"
            )
        if not tokens:
            start = number
        tokens.append(columns[token_column])
        tags.append(tag)
    if tokens:
        yield start, {"tokens": tokens, "tags": tags}


def _example_reader(name: str, config: TaskDataConfig) -> Callable[[str, int | None], list[Example]]:
    """A function ``(uri, max_rows) -> examples`` reading one file of this task into output-shaped records."""
    task = f"tasks.{name}"
    kind = kinds.get(config.type)
    if kind.file_format == "conll":

        def read_conll_file(uri: str, max_rows: int | None) -> list[Example]:
            suffix = PurePosixPath(uri).suffix.lower()
            if config.format != "conll" and not (config.format == "auto" and suffix in _CONLL_SUFFIXES):
                raise DataError(
                    f"{task}: {uri} must be a CoNLL-style file for type {kind.name}, but format is {config.format!r} "
                    f"and the suffix {suffix or '(none)'!r}; set {task}.format to conll (or use a "
                    f"{'/'.join(_CONLL_SUFFIXES)} file)"
                )
            return _read_conll(uri, config.token_column, config.tag_column, max_rows)

        return read_conll_file

    if config.format == "conll":
        conll = [k.name for k in kinds.KINDS.values() if k.file_format == "conll"]
        raise DataError(f"{task}: format conll is only for type {' or '.join(conll)}; set {task}.format to auto, "
                        "jsonl, csv or parquet")
    settings = kind.columns(config)  # output column -> the recipe setting naming its field in the file
    fields = {column: getattr(config, setting) for column, setting in settings.items()}
    setting_of = {fields[column]: setting for column, setting in settings.items()}
    text_columns = [column for column in fields if column != "label"]

    def fix(field: str) -> str:
        return f"fix the file, or set {task}.{setting_of[field]} to the field that holds it"

    def read(uri: str, max_rows: int | None) -> list[Example]:
        raw = _read_records(
            uri,
            list(fields.values()),
            format=config.format,
            max_rows=max_rows,
            string_fields=tuple(fields[column] for column in text_columns),
            fix=fix,
        )
        examples = []
        for origin, record in raw:
            shaped = {column: _string(record[fields[column]], origin, fields[column], fix) for column in text_columns}
            if "label" in fields:
                shaped["label"] = _label(record[fields["label"]], origin, fields["label"], fix)
            examples.append((origin, shaped))
        return examples

    return read


def _string(value: object, origin: str, field: str, fix: Callable[[str], str]) -> str:
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {field!r} must be a string, got {_shown(value)} ({fix(field)})")
    return value


def _label(value: object, origin: str, field: str, fix: Callable[[str], str]) -> str:
    # Floats are refused rather than stringified: "1.0" and "1" would silently become different classes.
    if isinstance(value, str | int):
        return str(value)
    raise DataError(
        f"{origin}: label field {field!r} must be a string or an integer, got {_shown(value)} ({fix(field)})"
    )


def _shown(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.60}"


def _read_split(
    read: Callable[[str, int | None], list[Example]], paths: str | list[str], max_examples: int | None, seed: int
) -> list[Example]:
    examples = [example for uri in ([paths] if isinstance(paths, str) else paths) for example in read(str(uri), None)]
    if max_examples is None:
        return examples
    return [examples[i] for i in stable_sample([_canonical(record) for _, record in examples], max_examples, seed)]


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _digest(records: Iterable[dict]) -> str:
    return digest_texts(_canonical(record) for record in records)


def _dedupe(examples: list[Example]) -> list[Example]:
    first: dict[str, Example] = {}
    for example in examples:
        first.setdefault(_canonical(example[1]), example)
    return list(first.values())


def _hold_out(train: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    # split_train_validation hashes each string with the seed; the canonical JSON makes that a hash of
    # the whole record. Train is already deduped, so the strings map back to examples one to one.
    by_key = {_canonical(record): (origin, record) for origin, record in train}
    kept, held = split_train_validation(list(by_key), fraction, seed)
    return [by_key[key] for key in kept], [by_key[key] for key in held]


def _check_labels(name: str, config: TaskDataConfig, splits: dict[str, list[Example] | None]) -> tuple[str, ...]:
    kind = kinds.get(config.type)
    if not kind.has_head:
        return ()  # nothing to predict but text: no label set
    labels_of = kind.labels_of
    present = {split: examples for split, examples in splits.items() if examples is not None}
    if config.labels is not None:
        duplicated = sorted(label for label, n in Counter(config.labels).items() if n > 1)
        if duplicated:
            listed = ", ".join(map(repr, duplicated))
            raise DataError(f"tasks.{name}.labels lists {listed} more than once; list each label once")
        allowed = set(config.labels)
        for split, examples in present.items():
            for origin, record in examples:
                for label in labels_of(record):
                    if label not in allowed:
                        raise DataError(
                            f"label {label!r} in the {split} split ({origin}) is not in tasks.{name}.labels "
                            f"({', '.join(config.labels)}); add it to labels: or fix the data"
                        )
        return tuple(config.labels)

    seen = {label for _, record in present["train"] for label in labels_of(record)}
    for split in ("validation", "test"):
        for origin, record in present.get(split, ()):
            for label in labels_of(record):
                if label not in seen:
                    raise DataError(
                        f"label {label!r} in the {split} split ({origin}) never occurs in training; "
                        f"fix the data or list every label under tasks.{name}.labels"
                    )
    return kind.label_order(seen)


def _write(name: str, split: str, config: TaskDataConfig, records: list[dict], out_dir: str | Path) -> DatasetRef:
    return write_records(records, kinds.get(config.type).schema(config), name=name, split=split, out_dir=out_dir)


def write_records(records: list[dict], schema: pa.Schema, *, name: str, split: str, out_dir: str | Path) -> DatasetRef:
    """Write records as ``<out_dir>/<name>-<digest>/<split>.parquet`` with the digest ``load_records`` checks (a
    file already there, same content, is reused). Extra columns (provenance, say) are kept and digested too."""
    table = pa.Table.from_pylist(records, schema=schema)
    return write_split_table(table, _digest(records), name=name, split=split, out_dir=out_dir)


def record_id(record: dict) -> str:
    """A short content id of a record: the same example has the same id in any re-prepared split."""
    return hashlib.sha256(_canonical(record).encode()).hexdigest()[:16]
