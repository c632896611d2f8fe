"""Labelled task data (classification, NER, SFT): the real task sets, every error a user can hit, stability, S3."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptflow.config import TaskDataConfig
from adaptflow.data.labelled import (
    TaskSplits,
    label_counts,
    load_records,
    prepare_task,
    read_conll,
    read_records,
)
from adaptflow.errors import DataError
from tests.conftest import DATA_ROOT

DATA = DATA_ROOT
CHEMPROT = DATA / "biomedical" / "chemprot"
CLAUDETTE = DATA / "legal" / "claudette_unfair_tos"
NCBI = DATA / "biomedical" / "ncbi_disease_ner"

# Lines 1-8: two sentences with a -DOCSTART- line between them, four tab-separated columns, tag last.
CONLL = (
    "Mutations\tNN\tO\tO\nin\tNN\tO\tO\nBRCA1\tNN\tO\tB-Disease\n\n"
    "-DOCSTART-\tX\tX\tO\n\n"
    "Cancer\tNN\tO\tB-Disease\nrisk\tNN\tO\tI-Disease\n"
)


def needs_data(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def toy_task(tmp_path: Path, **overrides) -> TaskDataConfig:
    """A 3-class toy task: train holds every label twice (plus one exact duplicate), dev and test a few rows."""
    train = [{"text": f"sentence {i}", "label": "abc"[i % 3], "id": i} for i in range(6)]
    settings = {
        "type": "classification",
        "train": write_jsonl(tmp_path / "train.jsonl", [*train, train[0]]),
        "validation": write_jsonl(tmp_path / "dev.jsonl", [{"text": "dev one", "label": "a"}]),
        "test": write_jsonl(tmp_path / "test.jsonl", [{"text": "test one", "label": "b"}, {"text": "t", "label": "c"}]),
    }
    return TaskDataConfig(**{**settings, **overrides})


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_chemprot_thirteen_relations(tmp_path):
    needs_data(CHEMPROT)
    config = TaskDataConfig(
        type="classification",
        train=str(CHEMPROT / "train.jsonl"),
        validation=str(CHEMPROT / "dev.jsonl"),
        test=str(CHEMPROT / "test.jsonl"),
    )
    splits = prepare_task("chemprot", config, out_dir=tmp_path)
    assert isinstance(splits, TaskSplits) and splits.kind == "classification"
    assert len(splits.labels) == 13 and list(splits.labels) == sorted(splits.labels)
    assert {"INHIBITOR", "SUBSTRATE", "AGONIST-INHIBITOR", "SUBSTRATE_PRODUCT-OF"} <= set(splits.labels)
    # 25 sentences occur twice in train, but always with two different relations: no exact duplicates.
    assert (splits.train.rows, splits.validation.rows, splits.test.rows) == (4169, 2427, 3469)
    assert splits.train.name == "chemprot/train"

    train = load_records(splits.train)
    assert set(train[0]) == {"text", "label"} and "<<" in train[0]["text"] and "[[" in train[0]["text"]
    counts = label_counts(train, "classification")
    assert next(iter(counts)) == "INHIBITOR" and sum(counts.values()) == 4169
    for split in (splits.validation, splits.test):
        assert set(label_counts(load_records(split), "classification")) <= set(splits.labels)


def test_claudette_binary_unfair_from_folds(tmp_path):
    needs_data(CLAUDETTE)
    config = TaskDataConfig(
        type="classification",
        train=[str(CLAUDETTE / f"fold{k}.jsonl") for k in (2, 3, 4)],
        validation=str(CLAUDETTE / "fold1.jsonl"),
        test=str(CLAUDETTE / "fold0.jsonl"),
        label_field="unfair",
    )
    raw = read_records(CLAUDETTE / "fold2.jsonl", fields=["text", "unfair"], optional=("doc", "missing"))
    assert set(raw[0]) == {"text", "unfair", "doc"} and {r["unfair"] for r in raw} == {0, 1}

    splits = prepare_task("claudette", config, out_dir=tmp_path)
    assert splits.labels == ("0", "1")
    # 10,529 sentences in folds 2-4; 860 exact repeats (mostly section numbers such as "1.") are dropped.
    assert (splits.train.rows, splits.validation.rows, splits.test.rows) == (9669, 3038, 3816)
    counts = label_counts(load_records(splits.train), "classification")
    assert 0.07 < counts["1"] / splits.train.rows < 0.09


def test_ncbi_disease_conll(tmp_path):
    needs_data(NCBI)
    counts = {split: len(read_conll(NCBI / f"{split}.txt")) for split in ("train", "dev", "test")}
    assert counts == {"train": 5424, "dev": 923, "test": 940}
    first = read_conll(NCBI / "train.txt", max_rows=1)
    assert first[0]["tokens"][:3] == ["Identification", "of", "APC2"]
    assert first[0]["tags"][8:12] == ["B-Disease", "I-Disease", "I-Disease", "I-Disease"]

    config = TaskDataConfig(
        type="ner", train=str(NCBI / "train.txt"), validation=str(NCBI / "dev.txt"), test=str(NCBI / "test.txt")
    )
    splits = prepare_task("ncbi", config, out_dir=tmp_path)
    assert splits.labels == ("O", "B-Disease", "I-Disease")
    # 23 train sentences repeat exactly (e.g. "RESULTS ." four times); dev and test are kept as given.
    assert (splits.train.rows, splits.validation.rows, splits.test.rows) == (5401, 923, 940)
    train = load_records(splits.train)
    assert set(train[0]) == {"tokens", "tags"} and len(train[0]["tokens"]) == len(train[0]["tags"])
    assert set(label_counts(train, "ner")) == {"O", "B-Disease", "I-Disease"}


def test_conll_whitespace_docstart_and_tag_column(tmp_path):
    path = tmp_path / "tiny.conll"
    path.write_text("-DOCSTART- O\n\nAcute O\nleukemia B-Disease\n\n\nends O\n", encoding="utf-8")
    assert read_conll(path) == [
        {"tokens": ["Acute", "leukemia"], "tags": ["O", "B-Disease"]},
        {"tokens": ["ends"], "tags": ["O"]},
    ]
    four = tmp_path / "four.txt"
    four.write_text(CONLL, encoding="utf-8")
    assert read_conll(four, max_rows=1) == [{"tokens": ["Mutations", "in", "BRCA1"], "tags": ["O", "O", "B-Disease"]}]
    assert len(read_conll(four, tag_column=3)) == 2


def test_sft_with_held_out_validation(tmp_path):
    rows = [{"instruction": f"Summarise case {i}.", "answer": f"Case {i} was dismissed.", "id": i} for i in range(40)]
    config = TaskDataConfig(
        type="sft",
        train=write_jsonl(tmp_path / "sft.jsonl", rows + rows[:3]),
        prompt_field="instruction",
        response_field="answer",
        validation_fraction=0.25,
    )
    splits = prepare_task("sft", config, out_dir=tmp_path / "out", seed=5)
    assert splits.labels == () and splits.test is None
    train, validation = load_records(splits.train), load_records(splits.validation)
    assert set(train[0]) == {"prompt", "response"}
    assert len(train) + len(validation) == 40 and 3 <= len(validation) <= 20
    prompts = [r["prompt"] for r in train]
    assert prompts == sorted(prompts, key=lambda p: int(p.split()[2].rstrip(".")))  # input order kept
    assert not set(prompts) & {r["prompt"] for r in validation}
    again = prepare_task("sft", config, out_dir=tmp_path / "out", seed=5)
    assert again == splits and prepare_task("sft", config, out_dir=tmp_path / "out", seed=6) != splits
    assert label_counts(train, "sft") == {}


def test_csv_text_pair_and_max_examples_across_files(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("premise,hypothesis,label\nA cat.,An animal.,1\nA dog.,A car.,0\n", encoding="utf-8")
    second.write_text("premise,hypothesis,label\nRain.,Wet.,1\nSun.,Snow.,0\n", encoding="utf-8")
    config = TaskDataConfig(
        type="classification",
        train=[str(first), str(second)],
        test=str(second),
        text_field="premise",
        text_pair_field="hypothesis",
        validation_fraction=0,
        max_examples=3,
    )
    splits = prepare_task("pairs", config, out_dir=tmp_path / "out")
    assert splits.validation is None and splits.labels == ("0", "1")
    every = [
        {"text": "A cat.", "text_pair": "An animal.", "label": "1"},
        {"text": "A dog.", "text_pair": "A car.", "label": "0"},
        {"text": "Rain.", "text_pair": "Wet.", "label": "1"},
        {"text": "Sun.", "text_pair": "Snow.", "label": "0"},
    ]
    train = load_records(splits.train)
    assert len(train) == 3 and train == [r for r in every if r in train]  # a sample, in file order
    assert splits.test.rows == 2
    assert pq.read_schema(splits.train.uri).names == ["text", "text_pair", "label"]


def test_max_examples_samples_a_label_sorted_file_instead_of_taking_its_head(tmp_path):
    rows = [{"text": f"review {i}", "label": "positive" if i < 500 else "negative"} for i in range(1000)]
    path = tmp_path / "sorted.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    config = TaskDataConfig(type="classification", train=str(path), validation_fraction=0, max_examples=100)
    train = load_records(prepare_task("sorted", config, out_dir=tmp_path / "out", seed=3).train)
    assert len(train) == 100 and 30 < label_counts(train, "classification")["negative"] < 70
    assert train == [r for r in rows if r in train]
    again = load_records(prepare_task("sorted", config, out_dir=tmp_path / "out", seed=3).train)
    assert again == train
    # The sample is drawn independently of the validation hold-out (both hash the records with the seed).
    held = prepare_task("sorted", config.model_copy(update={"validation_fraction": 0.2}), out_dir=tmp_path / "out",
                        seed=3)
    assert 10 <= held.validation.rows <= 30 and held.train.rows + held.validation.rows == 100


def test_unseen_test_label_is_named_with_file_and_line(tmp_path):
    test = write_jsonl(tmp_path / "zebra.jsonl", [{"text": "x", "label": "a"}] * 2 + [{"text": "y", "label": "zebra"}])
    config = toy_task(tmp_path, test=test)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare_task("toy", config, out_dir=out)
    message = str(err.value)
    assert "label 'zebra' in the test split" in message and f"{test} line 3" in message
    assert "never occurs in training" in message and "tasks.toy.labels" in message
    assert files_under(out) == []  # checked before anything is written

    listed = prepare_task("toy", config.model_copy(update={"labels": ["c", "b", "a", "zebra"]}), out_dir=out)
    assert listed.labels == ("c", "b", "a", "zebra")


def test_label_outside_configured_labels(tmp_path):
    config = toy_task(tmp_path, labels=["a", "b"])
    with pytest.raises(DataError) as err:
        prepare_task("toy", config, out_dir=tmp_path / "out")
    message = str(err.value)
    assert "label 'c' in the train split" in message and f"{tmp_path / 'train.jsonl'} line 3" in message
    assert "tasks.toy.labels" in message and "add it to labels:" in message


def test_conll_bad_column_count(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text(CONLL.replace("risk\tNN\tO\tI-Disease", "risk\tNN\tI-Disease"), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_conll(path)
    message = str(err.value)
    assert f"{path} line 8: expected 4 columns, found 3" in message and "line 1" in message


def test_conll_tag_that_is_not_iob2(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text(CONLL.replace("B-Disease\n\n-DOC", "DISEASE\n\n-DOC"), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_conll(path)
    message = str(err.value)
    assert f"{path} line 3: tag 'DISEASE' is not IOB2" in message and "tag_column" in message
    with pytest.raises(DataError, match="line 1: tag 'NN' is not IOB2"):
        read_conll(tmp_path / "bad.txt", tag_column=1)


def test_malformed_jsonl_line(tmp_path):
    config = toy_task(tmp_path)
    Path(config.validation).write_text('{"text": "ok", "label": "a"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare_task("toy", config, out_dir=tmp_path / "out")
    message = str(err.value)
    assert f"{config.validation} line 2: malformed JSON" in message and "one JSON object" in message


def test_missing_label_field_lists_fields_present(tmp_path):
    config = toy_task(tmp_path, label_field="category")
    with pytest.raises(DataError) as err:
        prepare_task("toy", config, out_dir=tmp_path / "out")
    message = str(err.value)
    assert f"{config.train} line 1: no field 'category'" in message
    assert "fields present: text, label, id" in message and "tasks.toy.label_field" in message


def test_non_utf8_names_file_and_line(tmp_path):
    config = toy_task(tmp_path)
    Path(config.test).write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8") as err:
        prepare_task("toy", config, out_dir=tmp_path / "out")
    assert config.test in str(err.value) and "re-encode the file as UTF-8" in str(err.value)

    conll = tmp_path / "latin1.txt"
    conll.write_bytes(b"Na\xefve\tO\n")
    with pytest.raises(DataError, match=f"{conll} line 1: not valid UTF-8"):
        read_conll(conll)


def test_wrong_value_types_and_formats(tmp_path):
    config = toy_task(tmp_path)
    write_jsonl(Path(config.validation), [{"text": "ok", "label": 1.0}])
    with pytest.raises(DataError, match="line 1: label field 'label' must be a string or an integer, got float"):
        prepare_task("toy", config, out_dir=tmp_path / "out")
    write_jsonl(Path(config.validation), [{"text": None, "label": "a"}])
    with pytest.raises(DataError, match="field 'text' must be a string, got null.*tasks.toy.text_field"):
        prepare_task("toy", config, out_dir=tmp_path / "out")

    with pytest.raises(DataError, match="set tasks.toy.format to conll"):
        prepare_task("toy", TaskDataConfig(type="ner", train=config.train), out_dir=tmp_path / "out")
    with pytest.raises(DataError, match="conll is only for type ner"):
        prepare_task("toy", config.model_copy(update={"format": "conll"}), out_dir=tmp_path / "out")
    (tmp_path / "notes.txt").write_text("a note\n", encoding="utf-8")
    with pytest.raises(DataError, match="plain text file"):
        read_records(tmp_path / "notes.txt", fields=["text"])
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl contains no records"):
        read_records(tmp_path / "empty.jsonl", fields=["text"])


def test_prepare_is_content_addressed_stable_and_idempotent(tmp_path):
    config = toy_task(tmp_path, validation=None, validation_fraction=0.3)
    out = tmp_path / "out"
    splits = prepare_task("toy", config, out_dir=out, seed=1)
    assert splits.validation is not None and splits.train.rows + splits.validation.rows == 6  # duplicate dropped
    for split in ("train", "validation", "test"):
        ref = getattr(splits, split)
        assert ref.uri == str(out.resolve() / f"toy-{ref.digest}" / f"{split}.parquet") and len(ref.digest) == 16

    mtimes = {p: p.stat().st_mtime_ns for p in files_under(out)}
    assert prepare_task("toy", config, out_dir=out, seed=1) == splits
    assert {p: p.stat().st_mtime_ns for p in files_under(out)} == mtimes
    assert not [p for p in files_under(out) if p.name.endswith(".tmp")]
    assert splits.to_dict()["labels"] == ["a", "b", "c"] and splits.to_dict()["train"]["rows"] == splits.train.rows

    # The held-out side of a record depends on the record and the seed only, not on the other records.
    held = {r["text"] for r in load_records(splits.validation)}
    more = [{"text": f"sentence {i}", "label": "abc"[i % 3]} for i in range(6)] + [
        {"text": f"extra {i}", "label": "a"} for i in range(30)
    ]
    grown_config = config.model_copy(update={"train": write_jsonl(tmp_path / "more.jsonl", more)})
    grown = prepare_task("toy", grown_config, out_dir=out, seed=1)
    assert {r["text"] for r in load_records(grown.validation)} - {f"extra {i}" for i in range(30)} == held


def test_load_records_detects_a_changed_file(tmp_path):
    splits = prepare_task("toy", toy_task(tmp_path), out_dir=tmp_path / "out")
    pq.write_table(pa.table({"text": ["tampered"], "label": ["a"]}), splits.test.uri)
    with pytest.raises(DataError, match="changed since it was prepared") as err:
        load_records(splits.test)
    assert splits.test.uri in str(err.value) and "re-run prepare_task" in str(err.value)


def test_prepare_task_from_s3(s3_env, s3_client, tmp_path):
    body = "".join(json.dumps({"text": f"clause {i}", "unfair": int(i % 5 == 0)}) + "\n" for i in range(30))
    s3_client.put_object(Bucket=s3_env, Key="raw/train.jsonl", Body=body.encode())
    config = TaskDataConfig(type="classification", train=f"s3://{s3_env}/raw/train.jsonl", label_field="unfair")
    out = f"s3://{s3_env}/prepared"

    splits = prepare_task("tos", config, out_dir=out)
    assert splits.labels == ("0", "1")
    assert splits.train.uri == f"{out}/tos-{splits.train.digest}/train.parquet"
    records = load_records(splits.train) + load_records(splits.validation)
    assert sorted(r["text"] for r in records) == sorted(f"clause {i}" for i in range(30))
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_env, Prefix="prepared/")["Contents"]]
    assert len(keys) == 2
    assert prepare_task("tos", config, out_dir=out) == splits


def test_test_fraction_holds_out_a_disjoint_stable_test_split_of_real_reviews(tmp_path):
    kitchen = DATA / "sentiment" / "amazon_kitchen"
    needs_data(kitchen)
    config = TaskDataConfig(type="classification", train=str(kitchen / "labelled.jsonl"), validation_fraction=0.2,
                            test_fraction=0.7)
    splits = prepare_task("kitchen", config, out_dir=tmp_path / "out", seed=7)
    train, validation, test = (load_records(s) for s in (splits.train, splits.validation, splits.test))
    reviews = [json.loads(line) for line in (kitchen / "labelled.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(train) + len(validation) + len(test) == len({r["text"] for r in reviews}) == 1977  # 23 repeated
    assert 150 <= len(train) <= 250 and 340 <= len(validation) <= 460 and 1320 <= len(test) <= 1480
    texts = [{r["text"] for r in split} for split in (train, validation, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    # The validation split is the one the task had without a test fraction: adding one never moves it.
    without = prepare_task("kitchen", config.model_copy(update={"test_fraction": 0.0}), out_dir=tmp_path / "b", seed=7)
    assert load_records(without.validation) == validation and without.test is None
    assert set(label_counts(train, "classification")) == {"positive", "negative"}


def test_test_fraction_must_leave_training_data(tmp_path):
    with pytest.raises(ValueError, match="must leave part of train"):
        toy_task(tmp_path, validation=None, test=None, validation_fraction=0.5, test_fraction=0.5)
    config = toy_task(tmp_path, test=None, test_fraction=0.999)  # every record's hash is below 0.997
    with pytest.raises(DataError, match="leaves nothing of its"):
        prepare_task("toy", config, out_dir=tmp_path / "out", seed=1)
    # A given test file wins over test_fraction, which then holds nothing out.
    given = prepare_task("toy", toy_task(tmp_path, test_fraction=0.5), out_dir=tmp_path / "given")
    assert given.test.rows == 2 and given.train.rows == 6
