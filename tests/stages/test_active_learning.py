"""Active-learning selection: the scores rank as they should, selection never repeats, and rounds grow a split."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from pydantic import ValidationError

from adaptflow.config import ModelConfig, TaskDataConfig, TinyModelConfig
from adaptflow.data.labelled import TaskSplits, load_records, prepare_task
from adaptflow.errors import ConfigError
from adaptflow.models import materialize_base_model
from adaptflow.refs import DatasetRef
from adaptflow.stages import StageEnv, finetune
from adaptflow.stages import active_learning as stage
from adaptflow.stages.active_learning import Config as ActiveLearningConfig
from adaptflow.stages.active_learning import (
    PoolPredictions,
    entropy_scores,
    kcenter_greedy,
    margin_scores,
    predict_pool,
    select,
)
from adaptflow.stages.active_learning import Result as SelectionResult
from adaptflow.stages.finetune import Config as FinetuneConfig

CONFIDENT = [0.96, 0.02, 0.02]
UNCERTAIN = [0.34, 0.33, 0.33]
TIED_TOP_TWO = [0.495, 0.49, 0.015]  # lower entropy than UNCERTAIN, but a nearer tie at the top


def test_entropy_and_margin_rank_uncertain_above_confident():
    probs = np.array([CONFIDENT, UNCERTAIN, TIED_TOP_TWO])
    entropy, margin = entropy_scores(probs), margin_scores(probs)
    assert entropy[1] > entropy[2] > entropy[0]
    assert entropy[1] == pytest.approx(np.log(3), abs=1e-3)
    assert margin[2] > margin[1] > margin[0]
    assert margin[0] == pytest.approx(1 - (0.96 - 0.02))


def test_uncertainty_selection_takes_the_top_k_and_skips_labelled_rows():
    probs = np.array([CONFIDENT, UNCERTAIN, TIED_TOP_TWO, CONFIDENT, UNCERTAIN])
    rows, scores = select("entropy", 2, np.random.default_rng(0), probs=probs, labelled=[1])
    assert rows == [4, 2] and scores[0] >= scores[1]
    rows, _ = select("margin", 1, np.random.default_rng(0), probs=probs)
    assert rows == [2]


def test_kcenter_picks_the_farthest_points_first():
    # A labelled cluster at the origin; far up, far right, a point near (5, 0), one just off the cluster.
    points = np.array([[0, 0], [0.1, 0], [0, 0.1], [5, 0], [0, 9], [0.5, 0.5], [4.5, 0.2]])
    rows, gaps = kcenter_greedy(points, [0, 1, 2], 3)
    # (0, 9) is farthest from the cluster; then (5, 0); (4.5, 0.2) is now close to a centre, (0.5, 0.5) is not.
    assert rows == [4, 3, 5]
    assert gaps[:2] == pytest.approx([8.9, 4.9])
    assert gaps == sorted(gaps, reverse=True)  # each new centre can only shrink the next gap


def test_kcenter_without_centres_starts_near_the_mean_and_spreads_out():
    points = np.array([[-1.0, 0], [0, 0.1], [1.0, 0], [0, 3]])
    rows, _ = kcenter_greedy(points, [], 2)
    assert rows == [1, 3]


@pytest.mark.parametrize("strategy", ["random", "entropy", "margin", "kcenter"])
def test_selection_never_repeats_and_respects_k(strategy):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=40)
    embeddings = rng.normal(size=(40, 8))
    labelled = list(range(0, 40, 5))
    rows, scores = select(strategy, 12, rng, probs=probs, embeddings=embeddings, labelled=labelled)
    assert len(rows) == len(scores) == 12 == len(set(rows))
    assert not set(rows) & set(labelled) and all(0 <= r < 40 for r in rows)
    rows, _ = select(strategy, 100, rng, probs=probs, embeddings=embeddings, labelled=labelled)
    assert sorted(rows) == sorted(set(range(40)) - set(labelled))  # k beyond the candidates: all of them, once


def test_random_selection_is_deterministic_for_a_seed():
    a, _ = select("random", 5, np.random.default_rng(7), n=50)
    b, _ = select("random", 5, np.random.default_rng(7), n=50)
    assert a == b


def test_config_rounds_sizes_and_validation():
    assert ActiveLearningConfig(task="t", initial=200, budget=800, rounds=3).sizes() == [200, 400, 600, 800]
    geometric = ActiveLearningConfig(task="t", initial=100, budget=800, rounds=3, growth="geometric")
    assert geometric.sizes() == [100, 200, 400, 800]
    assert ActiveLearningConfig(task="t", initial=10, budget=13, rounds=3, growth="geometric").sizes() == [
        10, 11, 12, 13]
    with pytest.raises(ValidationError, match=r"budget \(10\) must be at least initial \(8\) \+ rounds \(3\)"):
        ActiveLearningConfig(task="t", initial=8, budget=10, rounds=3)
    with pytest.raises(ValidationError, match=r"pool_max \(50\) must be at least the largest round's batch \(400\)"):
        ActiveLearningConfig(task="t", initial=100, budget=800, rounds=3, growth="geometric", pool_max=50)
    with pytest.raises(ValidationError, match="strategy"):
        ActiveLearningConfig(task="t", strategy="bald")
    with pytest.raises(ValidationError, match="(?i)extra"):
        ActiveLearningConfig(task="t", budjet=10)


def test_selection_refuses_non_classification_tasks_before_training(tmp_path):
    fake = DatasetRef(uri=str(tmp_path / "missing.parquet"), digest="0", rows=10)
    task = TaskSplits(kind="ner", train=fake, validation=None, test=None, labels=("O", "B-X", "I-X"))
    config = ActiveLearningConfig(task="ncbi", initial=4, budget=8, rounds=2)
    with pytest.raises(ConfigError, match="needs a classification task, not ner"):
        stage.run(config, stage.Inputs(base=None, task=task, finetune=FinetuneConfig(task="ncbi", max_steps=1)),
                  StageEnv(work_dir=tmp_path))
    with pytest.raises(ConfigError, match="use a classification task"):
        predict_pool("unused", [{"text": "x"}], kind="sft", labels=(), max_length=8)


# A tiny two-class task whose label a word decides, so a tiny BERT learns it in a few steps.
WORDS = "the a protein binds cell gene dose level assay tissue receptor signal".split()


def synthetic_task(tmp_path, n_train=60, n_eval=24) -> TaskSplits:
    rnd = random.Random(0)

    def rows(n, offset):
        out = []
        for i in range(n):
            label = "up" if (i + offset) % 2 else "down"
            words = rnd.choices(WORDS, k=rnd.randint(4, 12)) + [("raises" if label == "up" else "lowers")]
            rnd.shuffle(words)
            out.append({"text": f"{' '.join(words)} {i + offset}", "label": label})
        return out

    files = {}
    for split, n, offset in (("train", n_train, 0), ("dev", n_eval, 1000), ("test", n_eval, 2000)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows(n, offset)))
    config = TaskDataConfig(type="classification", train=str(files["train"]), validation=str(files["dev"]),
                            test=str(files["test"]))
    return prepare_task("toy", config, out_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    task = synthetic_task(tmp)
    tiny = TinyModelConfig(architecture="bert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=64, vocab_size=200)
    texts = [r["text"] for r in load_records(task.train)]
    base = materialize_base_model(ModelConfig(tiny=tiny), out_dir=tmp / "models", tokenizer_texts=texts, seed=0)
    return task, base


FINETUNE = FinetuneConfig(task="toy", max_steps=8, batch_size=8, lr=3e-3, max_length=32, warmup_ratio=0.0,
                          schedule="constant", log_every=4)


@pytest.mark.parametrize("strategy", ["entropy", "kcenter"])
def test_rounds_grow_a_subset_of_the_pool_that_loads_as_a_split(tmp_path, toy, strategy):
    task, base = toy
    config = ActiveLearningConfig(task="toy", strategy=strategy, initial=10, budget=30, rounds=2, pool_max=40)
    calls, curve = [], []

    def counted_finetune(config, inputs, env):
        calls.append(inputs.task.train.rows)
        return finetune.run(config, inputs, env)

    result = stage.run(config, stage.Inputs(base=base, task=task, finetune=FINETUNE),
                       StageEnv(work_dir=tmp_path, seed=5, log_metrics=lambda step, m: curve.append((step, m))),
                       finetune_round=counted_finetune)

    assert calls == [10, 20, 30]  # every round trains on all selected so far, the last one on the whole budget
    assert [p.labelled for p in result.curve] == [10, 20, 30] == [step for step, _ in curve]
    assert all({"val_macro_f1", "test_macro_f1"} <= set(p.metrics) for p in result.curve)
    rounds = [s.round for s in result.selected]
    assert rounds == sorted(rounds) and [rounds.count(r) for r in range(3)] == [10, 10, 10]
    indices = [s.index for s in result.selected]
    assert len(set(indices)) == 30 and all(0 <= i < task.train.rows for i in indices)
    later = [s for s in result.selected if s.round > 0]
    assert all(s.strategy == strategy and s.score is not None for s in later)
    assert all(s.strategy == "random" and s.score is None for s in result.selected if s.round == 0)

    pool = load_records(task.train)
    chosen = load_records(result.train)  # the digest matches: a split like any prepared one
    assert result.train.rows == 30 and chosen == [pool[i] for i in sorted(indices)]
    assert SelectionResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_same_seed_same_selection_and_the_last_round_can_skip_training(tmp_path, toy):
    task, base = toy
    config = ActiveLearningConfig(task="toy", strategy="margin", initial=8, budget=16, rounds=1,
                                  evaluate_final=False)
    inputs = stage.Inputs(base=base, task=task, finetune=FINETUNE)
    first = stage.run(config, inputs, StageEnv(work_dir=tmp_path / "a", seed=2))
    second = stage.run(config, inputs, StageEnv(work_dir=tmp_path / "b", seed=2))
    assert [p.labelled for p in first.curve] == [8]  # no model trained on the final 16
    assert first.selected == second.selected and first.train.digest == second.train.digest
    assert first.train.rows == 16
    key = stage.cache_key(config, inputs, seed=2)
    assert key == stage.cache_key(config, inputs, seed=2)
    assert key != stage.cache_key(config.model_copy(update={"strategy": "entropy"}), inputs, 2)
    assert key != stage.cache_key(config, inputs, seed=3)


def test_pool_predictions_come_back_in_record_order(toy):
    task, base = toy
    records = load_records(task.test)[:12]
    kwargs = dict(kind="classification", labels=task.labels, max_length=32, batch_size=5)
    forward = predict_pool(base, records, **kwargs)
    backward = predict_pool(base, records[::-1], **kwargs)
    assert isinstance(forward, PoolPredictions) and forward.embeddings.shape == (12, 32)
    np.testing.assert_allclose(forward.probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(forward.probs, backward.probs[::-1], atol=1e-5)
    np.testing.assert_allclose(forward.embeddings, backward.embeddings[::-1], atol=1e-5)
