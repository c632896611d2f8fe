"""Corpus reading, splitting and preparation, on local files and on a real S3 server (moto, loopback)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptflow import storage
from adaptflow.data.corpus import (
    PreparedCorpus,
    dedupe_exact,
    digest_texts,
    load_texts,
    prepare_corpus,
    read_texts,
    split_train_validation,
)
from adaptflow.errors import DataError
from adaptflow.storage import StorageUnavailable
from tests.conftest import DATA_ROOT

DATA = DATA_ROOT

RAW_DOCS = ["  First document.  ", "", "Second, with a comma and \"quotes\".", "   ", "Third: ünïcødé ✓"]
EXPECTED = ["First document.", "Second, with a comma and \"quotes\".", "Third: ünïcødé ✓"]


def parquet_bytes(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def corpus_bytes(fmt: str, docs: list[str]) -> bytes:
    if fmt == "txt":
        return "\n".join(docs).encode("utf-8") + b"\n"
    if fmt == "jsonl":
        return "\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)).encode("utf-8") + b"\n"
    if fmt == "csv":
        return csv_bytes(["id", "text"], [[str(i), d] for i, d in enumerate(docs)])
    return parquet_bytes({"id": list(range(len(docs))), "text": docs})


@pytest.fixture(params=["local", "s3"])
def put(request, tmp_path):
    """A function ``put(filename, data) -> uri`` that stores a file locally or in a fresh S3 bucket."""
    if request.param == "local":

        def put_local(filename: str, data: bytes) -> str:
            path = tmp_path / filename
            path.write_bytes(data)
            return str(path)

        return put_local

    client = request.getfixturevalue("s3_client")
    bucket = request.getfixturevalue("s3_env")

    def put_s3(filename: str, data: bytes) -> str:
        client.put_object(Bucket=bucket, Key=f"corpora/{filename}", Body=data)
        return f"s3://{bucket}/corpora/{filename}"

    return put_s3


@pytest.fixture
def local(tmp_path):
    def put_local(filename: str, data: bytes) -> str:
        path = tmp_path / filename
        path.write_bytes(data)
        return str(path)

    return put_local


@pytest.mark.parametrize("fmt,suffix", [("txt", "txt"), ("jsonl", "jsonl"), ("csv", "csv"), ("parquet", "parquet")])
def test_read_texts_each_format_strips_and_drops_blank(put, fmt, suffix):
    uri = put(f"corpus.{suffix}", corpus_bytes(fmt, RAW_DOCS))
    assert read_texts(uri) == EXPECTED
    assert read_texts(uri, format=fmt, max_rows=2) == EXPECTED[:2]


def test_format_override_for_unknown_suffix(local):
    uri = local("corpus.dat", b"one\ntwo\n")
    assert read_texts(uri, format="txt") == ["one", "two"]


def test_csv_keeps_numeric_looking_text_and_multiline_values(local):
    uri = local("c.csv", csv_bytes(["text"], [["1984"], ["line one\nline two"]]))
    assert read_texts(uri) == ["1984", "line one\nline two"]


def test_txt_handles_crlf_and_bom(local):
    uri = local("c.txt", "\ufeffalpha\r\n\r\nbeta\r\n".encode("utf-8"))
    assert read_texts(uri) == ["alpha", "beta"]


def test_real_ncbi_abstracts_txt_and_jsonl_agree():
    folder = DATA / "biomedical" / "unlabelled_ncbi_abstracts"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    from_txt = read_texts(folder / "abstracts.txt")
    assert len(from_txt) == 792
    assert read_texts(folder / "abstracts.jsonl") == from_txt


def test_real_bva_decisions_and_wikitext():
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    decisions = read_texts(DATA / "legal" / "unlabelled_bva_decisions" / "decisions.jsonl")
    assert len(decisions) == 50
    assert all("\n" in d for d in decisions)  # multi-line documents survive JSON decoding intact

    wiki_path = DATA / "general" / "wikitext-2-raw" / "wiki.valid.raw"
    wiki = read_texts(wiki_path)
    non_blank = [line.strip() for line in wiki_path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert wiki == non_blank
    assert wiki[0] == "= Homarus gammarus ="


def test_missing_local_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="corpus file not found") as err:
        read_texts(missing)
    assert str(missing) in str(err.value) and "check the path" in str(err.value)


def test_a_folder_is_a_corpus_of_its_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (folder / "b" / "c.jsonl").write_text('{"text": "three"}\n', encoding="utf-8")
    (folder / ".hidden.txt").write_text("never\n", encoding="utf-8")
    (folder / "_SUCCESS").write_text("", encoding="utf-8")
    assert read_texts(folder) == ["one", "two", "three"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        read_texts(tmp_path / "empty")
    (folder / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="notes.md"):
        read_texts(folder)


def test_an_s3_prefix_is_a_corpus_of_its_objects(s3_env, s3_client):
    for key, body in (("corpus/part-0.txt", b"alpha\nbeta\n"), ("corpus/part-1.txt", b"gamma\n")):
        s3_client.put_object(Bucket=s3_env, Key=key, Body=body)
    assert read_texts(f"s3://{s3_env}/corpus/") == ["alpha", "beta", "gamma"]


def test_missing_s3_key_and_bucket(s3_env):
    key_uri = f"s3://{s3_env}/no/such.txt"
    with pytest.raises(DataError, match="corpus file not found") as err:
        read_texts(key_uri)
    assert key_uri in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
    assert not isinstance(err.value, StorageUnavailable)

    bucket_uri = "s3://no-such-bucket-adaptflow/corpus.txt"
    with pytest.raises(DataError, match="bucket 'no-such-bucket-adaptflow' not found") as err:
        read_texts(bucket_uri)
    assert bucket_uri in str(err.value) and "create the bucket" in str(err.value)


@pytest.mark.parametrize(
    "filename,data",
    [
        ("empty.txt", b""),
        ("blank.txt", b"\n   \n\t\n"),
        ("empty.jsonl", b""),
        ("blank-texts.jsonl", b'{"text": "  "}\n\n{"text": ""}\n'),
        ("header-only.csv", b"id,text\n"),
        ("empty.csv", b""),
        ("zero-rows.parquet", parquet_bytes({"text": pa.array([], pa.string())})),
    ],
)
def test_empty_corpus(local, filename, data):
    uri = local(filename, data)
    with pytest.raises(DataError, match="contains no non-empty documents") as err:
        read_texts(uri)
    assert uri in str(err.value)


@pytest.mark.parametrize(
    "filename,data",
    [
        ("c.jsonl", b'{"doc": "1", "body": "x"}\n'),
        ("c.csv", b"doc,body\n1,x\n"),
        ("c.parquet", parquet_bytes({"doc": ["1"], "body": ["x"]})),
    ],
)
def test_missing_text_field_lists_fields_present(local, filename, data):
    uri = local(filename, data)
    with pytest.raises(DataError, match="'text'") as err:
        read_texts(uri)
    message = str(err.value)
    assert uri in message and "doc, body" in message and "text_field" in message
    assert read_texts(uri, text_field="body") == ["x"]


@pytest.mark.parametrize(
    "filename,data,line,offset",
    [
        ("bad.txt", b"good\nalso good\nbad \xff byte\n", 3, 19),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, 28),
        ("bad.csv", b"text\nok\n\xc3\x28\n", 3, 8),
    ],
)
def test_non_utf8_reports_line_and_offset(local, filename, data, line, offset):
    uri = local(filename, data)
    with pytest.raises(DataError, match=f"line {line}: not valid UTF-8 at byte offset {offset}") as err:
        read_texts(uri)
    assert uri in str(err.value) and "UTF-8" in str(err.value)


def test_malformed_jsonl_line(local):
    uri = local("c.jsonl", b'{"text": "ok"}\n\n{"text": "unterminated}\n')
    with pytest.raises(DataError, match="line 3: malformed JSON") as err:
        read_texts(uri)
    assert uri in str(err.value) and "Unterminated string" in str(err.value)


def test_json_array_gets_a_hint(local):
    uri = local("c.json", b'[{"text": "a"},\n {"text": "b"}]\n')
    with pytest.raises(DataError, match="JSON array.*JSON Lines"):
        read_texts(uri)


def test_jsonl_line_that_is_not_an_object(local):
    uri = local("c.jsonl", b'{"text": "ok"}\n["text"]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        read_texts(uri)


@pytest.mark.parametrize(
    "filename,data,where",
    [
        ("num.jsonl", b'{"text": "ok"}\n{"text": 42}\n', "line 2"),
        ("null.jsonl", b'{"text": "ok"}\n\n{"text": null}\n', "line 3"),
        ("null.parquet", parquet_bytes({"text": ["ok", None]}), "row 2"),
    ],
)
def test_non_string_text_names_the_record(local, filename, data, where):
    uri = local(filename, data)
    with pytest.raises(DataError, match=f"{where}: field 'text' must be a string") as err:
        read_texts(uri)
    assert uri in str(err.value)


def test_parquet_non_string_column(local):
    uri = local("ints.parquet", parquet_bytes({"text": [1, 2]}))
    with pytest.raises(DataError, match="column 'text' has type int64, expected string"):
        read_texts(uri)


def test_truncated_parquet(local):
    data = parquet_bytes({"text": [f"document {i}" for i in range(100)]})
    uri = local("cut.parquet", data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable parquet file") as err:
        read_texts(uri)
    assert uri in str(err.value) and "re-export" in str(err.value)


def test_unknown_suffix_and_format(local):
    uri = local("corpus.xml", b"<doc/>")
    with pytest.raises(DataError, match="set format to one of txt, jsonl, csv, parquet") as err:
        read_texts(uri)
    assert uri in str(err.value)
    with pytest.raises(DataError, match="unknown corpus format 'yaml'"):
        read_texts(uri, format="yaml")


def test_max_rows_counts_documents_not_lines(local):
    uri = local("c.txt", b"\n\na\n\nb\nc\n")
    assert read_texts(uri, max_rows=2) == ["a", "b"]
    with pytest.raises(DataError, match="max_rows"):
        read_texts(uri, max_rows=0)


def test_digest_is_framed_ordered_and_short():
    assert digest_texts(["ab", "c"]) != digest_texts(["a", "bc"])
    assert digest_texts(["a", "b"]) != digest_texts(["b", "a"])
    assert digest_texts(iter(["x", "y"])) == digest_texts(["x", "y"])
    assert len(digest_texts([])) == 16 and int(digest_texts(["x"]), 16) >= 0


def test_dedupe_exact_keeps_first_occurrences_in_order():
    kept, removed = dedupe_exact(["b", "a", " b ", "c", "a", "A"])
    assert kept == ["b", "a", "c", "A"]
    assert removed == 2


def test_split_is_deterministic_and_seed_dependent():
    docs = [f"document number {i}" for i in range(2000)]
    train, val = split_train_validation(docs, 0.1, seed=0)
    assert (train, val) == split_train_validation(docs, 0.1, seed=0)
    assert 150 < len(val) < 250 and len(train) + len(val) == len(docs)
    assert set(train).isdisjoint(val)
    assert [d for d in docs if d in set(val)] == val  # input order preserved
    assert split_train_validation(docs, 0.1, seed=1)[1] != val


def test_split_is_stable_when_documents_are_added():
    docs = [f"doc {i}" for i in range(300)]
    _, val = split_train_validation(docs, 0.2, seed=7)
    grown = docs + [f"new doc {i}" for i in range(300)]
    random.Random(0).shuffle(grown)
    _, grown_val = split_train_validation(grown, 0.2, seed=7)
    assert set(grown_val) & set(docs) == set(val)


def test_split_guarantees_for_small_corpora():
    assert split_train_validation(["a", "b", "c"], 0.001, seed=0)[1] != []
    train, val = split_train_validation(["a", "b"], 0.999, seed=0)
    assert len(train) == 1 and len(val) == 1
    assert split_train_validation(["only"], 0.5, seed=0) == (["only"], [])
    assert split_train_validation(["a", "b", "c"], 0.0, seed=0) == (["a", "b", "c"], [])
    with pytest.raises(ValueError, match="validation_fraction"):
        split_train_validation(["a", "b"], 1.0, seed=0)


def _corpus_with_duplicates() -> list[str]:
    docs = [f"Document {i} about veterans' appeals." for i in range(60)]
    return docs + docs[:5]


def test_prepare_corpus_locally_is_content_addressed_and_idempotent(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(_corpus_with_duplicates()), encoding="utf-8")
    out = tmp_path / "prepared"

    prepared = prepare_corpus(source, name="legal", out_dir=out, validation_fraction=0.2, seed=3)
    unique = dedupe_exact(read_texts(source))[0]
    assert isinstance(prepared, PreparedCorpus)
    assert (prepared.documents_read, prepared.duplicates_removed) == (65, 5)
    assert prepared.train.rows + prepared.validation.rows == 60 and prepared.validation.rows >= 1
    for split, ref in (("train", prepared.train), ("validation", prepared.validation)):
        assert ref.uri == str(out.resolve() / f"legal-{ref.digest}" / f"{split}.parquet")
        assert ref.name == f"legal/{split}"
        texts = load_texts(ref)
        assert len(texts) == ref.rows and texts == [t for t in unique if t in set(texts)]
    assert set(load_texts(prepared.train)).isdisjoint(load_texts(prepared.validation))

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare_corpus(source, name="legal", out_dir=out, validation_fraction=0.2, seed=3)
    assert again == prepared
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_prepare_corpus_with_zero_validation_and_max_documents(tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(20)), encoding="utf-8")
    prepared = prepare_corpus(source, name="tiny", out_dir=tmp_path / "out", validation_fraction=0, max_documents=8)
    assert prepared.train.rows == 8 and prepared.validation.rows == 0
    assert load_texts(prepared.validation) == []


def test_load_texts_detects_a_changed_file(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(f"text {i}" for i in range(30)), encoding="utf-8")
    prepared = prepare_corpus(source, name="c", out_dir=tmp_path / "out")
    Path(prepared.train.uri).write_bytes(parquet_bytes({"text": ["tampered"]}))
    with pytest.raises(DataError, match="changed since it was prepared") as err:
        load_texts(prepared.train)
    assert prepared.train.uri in str(err.value)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text("alpha\nbeta\ngamma\n", encoding="utf-8")
    out = tmp_path / "out"

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(DataError, match="cannot write .*No space left"):
        prepare_corpus(source, name="c", out_dir=out)
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_prepare_corpus_on_s3(s3_env, s3_client):
    s3_client.put_object(Bucket=s3_env, Key="raw/corpus.jsonl", Body=corpus_bytes("jsonl", _corpus_with_duplicates()))
    source = f"s3://{s3_env}/raw/corpus.jsonl"
    out = f"s3://{s3_env}/prepared"

    prepared = prepare_corpus(source, name="legal", out_dir=out, validation_fraction=0.2)
    assert prepared.duplicates_removed == 5
    assert prepared.train.uri == f"{out}/legal-{prepared.train.digest}/train.parquet"
    round_trip = load_texts(prepared.train) + load_texts(prepared.validation)
    assert sorted(round_trip) == sorted(set(_corpus_with_duplicates()))
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_env, Prefix="prepared/")["Contents"])
    assert len(keys) == 2

    # An existing split is reused, not rewritten: tamper with it and the re-run leaves it alone,
    # so the digest check in load_texts catches it.
    train_key = prepared.train.uri.removeprefix(f"s3://{s3_env}/")
    s3_client.put_object(Bucket=s3_env, Key=train_key, Body=parquet_bytes({"text": ["tampered"]}))
    assert prepare_corpus(source, name="legal", out_dir=out, validation_fraction=0.2) == prepared
    with pytest.raises(DataError, match="changed since it was prepared"):
        load_texts(prepared.train)


def test_unreachable_s3_endpoint_is_storage_unavailable(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # closed as soon as the socket goes: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as err:
        read_texts("s3://some-bucket/corpus.txt")
    assert time.monotonic() - started < 10
    assert endpoint in str(err.value) and "s3://some-bucket/corpus.txt" in str(err.value)


def test_storage_helpers_round_trip(tmp_path, s3_env):
    for base in (str(tmp_path / "a" / "b"), f"s3://{s3_env}/a/b"):
        uri = storage.join(base, "blob.bin")
        assert not storage.exists(uri)
        storage.write_bytes_atomic(uri, b"\x00payload")
        assert storage.exists(uri)
        assert storage.read_bytes(uri) == b"\x00payload"
        with storage.open_input(uri) as stream:
            assert stream.read() == b"\x00payload"
    assert storage.is_s3("S3://x/y") and not storage.is_s3("/tmp/s3://x")
    assert storage.filesystem_for(f"s3://{s3_env}/k")[1] == f"{s3_env}/k"
    assert storage.filesystem_for("relative/x")[1] == str(Path("relative/x").absolute())


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_a_streamed_preparation_equals_splitting_the_whole_list(tmp_path, monkeypatch, fmt):
    """Read 64 bytes at a time and written in ~2 KB row groups, a real corpus comes out as the in-memory rule
    would split it: the same documents in the same order (same digests), duplicates counted."""
    from adaptflow.data import formats
    from adaptflow.data.corpus import digest_texts, split_train_validation

    texts = read_texts(DATA / "legal" / "unlabelled_bva_decisions" / "decisions.jsonl", max_rows=150)
    texts = [t.replace("\n", " ") for t in texts]
    texts = texts + texts[:20]  # 20 exact duplicates
    source = tmp_path / f"corpus.{fmt}"
    source.write_bytes(corpus_bytes(fmt, texts))
    monkeypatch.setattr(formats, "CHUNK_BYTES", 64)
    monkeypatch.setattr(formats, "ROW_GROUP_BYTES", 2_000)
    prepared = prepare_corpus(source, name="c", out_dir=tmp_path / "out", validation_fraction=0.2, seed=3)
    train, validation = split_train_validation(dedupe_exact(texts)[0], 0.2, 3)
    assert (prepared.train.digest, prepared.validation.digest) == (digest_texts(train), digest_texts(validation))
    assert load_texts(prepared.train) == train and prepared.duplicates_removed == 20
    assert pq.ParquetFile(prepared.train.uri).num_row_groups > 5


def test_a_tiny_corpus_still_gets_one_validation_document_when_streamed(tmp_path):
    from adaptflow.data.corpus import split_train_validation

    source = tmp_path / "tiny.txt"
    texts = ["alpha beta", "gamma delta", "epsilon zeta"]
    source.write_text("\n".join(texts), encoding="utf-8")
    prepared = prepare_corpus(source, name="t", out_dir=tmp_path / "out", validation_fraction=0.01, seed=0)
    train, validation = split_train_validation(texts, 0.01, 0)
    assert len(validation) == 1 and load_texts(prepared.validation) == validation
    assert load_texts(prepared.train) == train
