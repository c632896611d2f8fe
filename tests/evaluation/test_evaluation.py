"""Evaluation suite pieces: seeded perturbations, pseudo-perplexity, the per-checkpoint task suite."""

from __future__ import annotations

import math

import pytest
import torch

from adaptflow.config import TaskDataConfig
from adaptflow.data.labelled import prepare_task, read_conll, read_records
from adaptflow.data.perturb import KINDS, perturb_records
from adaptflow.errors import DataError
from adaptflow.evaluation.perplexity import pseudo_perplexity
from adaptflow.evaluation.suite import RobustnessConfig, task_suite
from adaptflow.objectives import build_objective
from adaptflow.recipe import load_recipe
from adaptflow.stages import StageEnv, finetune
from tests.conftest import DATA_ROOT, DOMAINS, pack_texts

CHEMPROT = DATA_ROOT / "biomedical/chemprot/test.jsonl"
NCBI = DATA_ROOT / "biomedical/ncbi_disease_ner/test.txt"


@pytest.fixture(scope="module")
def sentences():
    return read_records(CHEMPROT, fields=["text", "label"], max_rows=200)


@pytest.mark.parametrize("kind", KINDS)
def test_perturbations_are_deterministic_under_a_seed_and_keep_labels(sentences, kind):
    first = perturb_records(sentences, kind, rate=0.15, seed=7)
    assert first == perturb_records(sentences, kind, rate=0.15, seed=7)
    assert first != perturb_records(sentences, kind, rate=0.15, seed=8)
    assert [r["label"] for r in first] == [r["label"] for r in sentences]
    changed = sum(a["text"] != b["text"] for a, b in zip(first, sentences, strict=True))
    assert changed > len(sentences) / 2, f"{kind} changed only {changed} of {len(sentences)} sentences"
    assert perturb_records(sentences, kind, rate=0.0, seed=7) == [dict(r) for r in sentences]


def test_one_examples_noise_does_not_depend_on_the_others(sentences):
    """Example i's noise is a function of (seed, kind, i) alone: different neighbours, same noise."""
    others = [{"text": "short one", "label": "x"}] * 5 + sentences[5:10]
    for kind in KINDS:
        assert perturb_records(others, kind, rate=0.3, seed=1)[5:] == perturb_records(sentences[:10], kind,
                                                                                       rate=0.3, seed=1)[5:]


@pytest.mark.parametrize("kind", KINDS)
def test_ner_perturbations_keep_one_tag_per_token_in_valid_iob2(kind):
    records = read_conll(NCBI, max_rows=200)
    for record in perturb_records(records, kind, rate=0.3, seed=3):
        assert len(record["tokens"]) == len(record["tags"]) >= 1
        assert all(token and token == token.strip() for token in record["tokens"])
        for previous, tag in zip(["O", *record["tags"]], record["tags"], strict=False):
            assert not tag.startswith("I-") or previous[2:] == tag[2:], record


def test_pseudo_perplexity_matches_a_hand_computed_value(tiny_bert, abstracts, tmp_path):
    """Each scored token masked alone, predicted over the full vocabulary: exp(mean −log p), by hand."""
    model, tokenizer = tiny_bert
    model.eval()
    packed = pack_texts(abstracts[:20], tokenizer, "mlm", 16, tmp_path).head(3)
    blocks = packed.input_ids
    special = set(tokenizer.all_special_ids)
    result = pseudo_perplexity(model, build_objective("mlm", tokenizer), packed, special_ids=special,
                               mask_id=tokenizer.mask_token_id, max_tokens=30, batch_size=7,
                               device=torch.device("cpu"))
    scored = [(b, p) for b in range(len(blocks)) for p in range(blocks.shape[1])
              if int(blocks[b, p]) not in special][:30]
    nll = []
    with torch.no_grad():
        for b, p in scored:
            ids = blocks[b : b + 1].clone()
            ids[0, p] = tokenizer.mask_token_id
            nll.append(-float(model(input_ids=ids).logits[0, p].log_softmax(-1)[blocks[b, p]]))
    assert any(int(t) in special for t in blocks.flatten()), "the blocks hold special tokens to skip"
    assert result["tokens"] == 30
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_task_suite_scores_the_test_set_ood_sets_and_noise_and_refuses_unknown_labels(tmp_path):
    from tests.stages.test_finetune import CHEMPROT_LABELS, tiny_base

    chemprot = DATA_ROOT / "biomedical/chemprot"
    task = prepare_task("chemprot", TaskDataConfig(
        type="classification", train=str(chemprot / "train.jsonl"), test=str(chemprot / "test.jsonl"),
        labels=CHEMPROT_LABELS, max_examples=160), out_dir=tmp_path / "data")
    dev = prepare_task("dev", TaskDataConfig(type="classification", train=str(chemprot / "dev.jsonl"),
                                             labels=CHEMPROT_LABELS, max_examples=80), out_dir=tmp_path / "data")
    config = finetune.Config(task="chemprot", max_steps=4, batch_size=16, max_length=64, lr=3e-3)
    result = finetune.run(config, finetune.Inputs(base=tiny_base(tmp_path), task=task),
                          StageEnv(work_dir=tmp_path / "stages", seed=1))

    def suite(ood):
        return task_suite(result.checkpoint, kind="classification", labels=CHEMPROT_LABELS, test=task.test,
                          max_length=config.max_length, prompt_template=config.prompt_template, ood=ood,
                          robustness=RobustnessConfig(max_examples=50), seed=3)

    metrics = suite({"dev": [dev.train, dev.validation]})
    assert metrics["test_macro_f1"] == pytest.approx(result.metrics["test_macro_f1"])
    assert {"ood_dev_macro_f1", "ood_dev_accuracy", "test_ece"} <= set(metrics)
    for kind in KINDS:
        assert metrics[f"robust_{kind}_drop"] == pytest.approx(
            metrics["robust_clean_macro_f1"] - metrics[f"robust_{kind}_macro_f1"])
    assert metrics["robustness_drop_max"] == max(metrics[f"robust_{k}_drop"] for k in KINDS)
    assert suite({"dev": [dev.train, dev.validation]}) == metrics  # seeded: the same numbers again

    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "a review", "label": "POSITIVE"}\n' * 20)
    stranger = prepare_task("other", TaskDataConfig(type="classification", train=str(other)), out_dir=tmp_path / "data")
    with pytest.raises(DataError, match="labels the model does not know: \\['POSITIVE'\\]"):
        suite({"other": [stranger.train]})


def test_gates_pass_fail_and_fail_when_their_number_was_not_measured():
    from adaptflow.evaluation.gates import GatesConfig, check_gates

    metrics = {"eval.test_macro_f1_mean": 0.42, "general_perplexity_change_pct": 12.0,
               "eval.robustness_drop_max_mean": 0.08}
    gates = {g.name: g for g in check_gates(GatesConfig(min_task_metric=0.40, max_general_perplexity_rise_pct=10,
                                                        max_robustness_drop=0.1), metrics, metric="macro_f1")}
    assert gates["min_task_metric"].passed and gates["min_task_metric"].value == 0.42
    assert not gates["max_general_perplexity_rise_pct"].passed
    assert gates["max_general_perplexity_rise_pct"].reason == "general-text perplexity change % 12.0000 > 10"
    assert gates["max_robustness_drop"].passed
    unmeasured = check_gates(GatesConfig(min_task_metric=0.4), {}, metric="entity_f1")
    assert [(g.passed, g.value) for g in unmeasured] == [(False, None)]
    assert "eval.test_entity_f1_mean missing" in unmeasured[0].reason
    assert check_gates(GatesConfig(), metrics, metric="macro_f1") == []
    first = check_gates(GatesConfig(min_gain_over_champion=0.01), metrics, metric="macro_f1")
    assert first[0].passed and first[0].reason == "no champion yet: nothing to beat"
    beaten = check_gates(GatesConfig(min_gain_over_champion=0.01), metrics | {"champion_version": 3.0,
                                                                             "champion_gain": 0.004}, metric="macro_f1")
    assert not beaten[0].passed and beaten[0].reason == "test macro_f1 gain over champion v3 0.0040 < 0.01"


def test_a_gate_on_a_number_that_is_never_measured_is_a_recipe_error():
    from adaptflow.errors import RecipeError

    with pytest.raises(RecipeError, match="reads corpus 'general', which is not evaluated"):
        load_recipe(DOMAINS / "tiny.yaml", ["evaluation.corpora=[domain]",
                                            "evaluation.gates.max_general_perplexity_rise_pct=10"])
    with pytest.raises(RecipeError, match="max_robustness_drop needs evaluation.robustness"):
        load_recipe(DOMAINS / "tiny.yaml", ["evaluation.robustness=null", "evaluation.gates.max_robustness_drop=0.1"])
