"""Task kinds: each one keeps the `TaskKind` protocol, the registry alone decides which `type` a recipe's task may
have, and each kind encodes its records as its model needs them (first sub-tokens labelled, prompt masked, pairs
marked)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from adaptflow import kinds
from adaptflow.config import TaskDataConfig
from adaptflow.data.labelled import prepare_task
from adaptflow.kinds.ner import align_labels
from adaptflow.kinds.sft import InstructionSFT, encode_sft
from adaptflow.models import load_task_model
from adaptflow.objectives.padding import IGNORE
from tests.stages.test_finetune import tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


PROTOCOL = {name for name, _ in inspect.getmembers(kinds.TaskKind) if not name.startswith("_")}
PROTOCOL |= set(kinds.TaskKind.__annotations__)


@pytest.mark.parametrize("name", sorted(kinds.KINDS))
def test_every_kind_keeps_the_protocol(name):
    kind = kinds.get(name)
    assert kind.name == name
    assert PROTOCOL <= set(dir(kind)), PROTOCOL - set(dir(kind))
    assert kind.file_format in ("records", "conll")


def test_the_registry_decides_which_task_types_a_recipe_may_name(monkeypatch):
    with pytest.raises(ValidationError, match="Input should be 'classification', 'ner' or 'sft'"):
        TaskDataConfig(type="regression", train="x.jsonl")
    monkeypatch.setitem(kinds.KINDS, "regression", kinds.get("classification"))
    assert TaskDataConfig(type="regression", train="x.jsonl").type == "regression"


def test_ner_labels_align_to_first_sub_tokens(base):
    tokenizer = AutoTokenizer.from_pretrained(base.uri)
    words = ["Hereditary", "nonpolyposis", "colorectal", "cancer", "."]
    tags = [1, 2, 2, 2, 0]
    enc = tokenizer(words, is_split_into_words=True)
    labels = align_labels(enc.word_ids(), tags)
    firsts = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
    assert [labels[i] for i in firsts] == tags
    assert all(label == IGNORE for i, label in enumerate(labels) if i not in firsts)
    assert len(enc["input_ids"]) > len(words) + 2, "the tiny vocabulary should split some words"


def test_sft_loss_masks_the_prompt(tmp_path):
    base = tiny_base(tmp_path, architecture="gpt2")
    model, tokenizer = load_task_model(base, "sft")
    item = encode_sft(tokenizer, "Name the disease.", "cystic fibrosis", template="Q: {prompt}\nA: ", max_length=64)
    prompt_len = len(tokenizer("Q: Name the disease.\nA: ", add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id

    objective = InstructionSFT(tokenizer.pad_token_id)
    batch = objective.collate([item], None)
    assert batch["n_targets"] == len(item["input_ids"]) - prompt_len
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits[prompt_len - 1:], batch["input_ids"][0, prompt_len:],
                                                 reduction="sum")
    torch.testing.assert_close(objective.loss(model, batch), expected)


def test_text_pairs_are_encoded_as_pairs(tmp_path, base):
    rows = [{"a": f"aspirin {i}", "b": "inhibits COX", "y": "yes" if i % 2 else "no"} for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = prepare_task("pairs", TaskDataConfig(type="classification", train=str(path), text_field="a",
                                                text_pair_field="b", label_field="y"), out_dir=tmp_path / "d")
    from adaptflow.data.labelled import load_records

    tokenizer = AutoTokenizer.from_pretrained(base.uri)
    items = kinds.get("classification").encode(load_records(task.train), tokenizer, labels=["no", "yes"],
                                               max_length=256, prompt_template=None)
    assert all(sum(item["token_type_ids"]) > 0 for item in items)  # the second segment is marked
    assert all(item["input_ids"].count(tokenizer.sep_token_id) == 2 for item in items)
