"""The training loop and the pretraining stage on tiny models: learning happens, and the loop's promises
(token-normalised accumulation, exact resume, head warm-up, NaN stop) hold."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from adaptflow.config import ModelConfig, PretrainConfig, TinyModelConfig
from adaptflow.data import load_texts, prepare_corpus
from adaptflow.errors import TrainingError
from adaptflow.models import materialize_base_model
from adaptflow.objectives import build_objective
from adaptflow.stages.pretrain import _optimizer_and_freezing, run_pretrain
from adaptflow.tokenize import pack_blocks, tokenize_corpus
from adaptflow.train import BatchSampler, LoopSettings, train
from tests.conftest import DATA_ROOT

ABSTRACTS = str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    return prepare_corpus(ABSTRACTS, name="domain", out_dir=out, max_documents=60, validation_fraction=0.15, seed=0)


def base_model(tmp_path, corpus, architecture="bert"):
    tiny = TinyModelConfig(architecture=architecture, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64, max_position_embeddings=128, vocab_size=500)
    return materialize_base_model(ModelConfig(tiny=tiny), out_dir=tmp_path / "models",
                                  tokenizer_texts=load_texts(corpus.train), seed=0)


def pretrain(tmp_path, corpus, base, **settings):
    config = PretrainConfig(**{"block_size": 32, "batch_size": 8, "max_steps": 30, "lr": 3e-3, "log_every": 5,
                               "eval_every": 15, "eval_max_blocks": 8, **settings})
    history: list[tuple[int, dict]] = []
    ref = run_pretrain(config, base=base, train_data=corpus.train, validation_data=corpus.validation,
                       work_dir=tmp_path / "stages", cache_dir=tmp_path / "cache", seed=0,
                       log_metrics=lambda step, m: history.append((step, m)))
    return ref, history


def series(history, key):
    return [m[key] for _, m in history if key in m]


@pytest.mark.parametrize("architecture,auto", [("bert", AutoModelForMaskedLM), ("gpt2", AutoModelForCausalLM),
                                               ("llama", AutoModelForCausalLM)])
def test_pretraining_learns_and_writes_a_loadable_checkpoint(tmp_path, corpus, architecture, auto):
    base = base_model(tmp_path, corpus, architecture)
    ref, history = pretrain(tmp_path, corpus, base)
    losses, held_out = series(history, "loss"), series(history, "eval_loss")
    assert losses[-1] < losses[0] - 0.25, losses
    assert held_out[-1] < held_out[0], held_out  # step-0 evaluation is the "before"
    assert ref.stage == "pretrain" and ref.digest != base.digest
    model = auto.from_pretrained(ref.uri)  # plain transformers, safetensors
    assert sum(p.numel() for p in model.parameters()) > 0
    lineage = json.loads((tmp_path / "stages").glob("pretrain-*/final/lineage.json").__next__().read_text())
    assert lineage["input_checkpoint"]["digest"] == base.digest
    assert {d["digest"] for d in lineage["datasets"]} == {corpus.train.digest, corpus.validation.digest}
    assert lineage["chain"][-1]["stage"] == "base"


def test_bf16_autocast_trains(tmp_path, corpus):
    base = base_model(tmp_path, corpus)
    _, history = pretrain(tmp_path, corpus, base, bf16=True, max_steps=20, eval_every=0)
    losses = series(history, "loss")
    assert losses[-1] < losses[0], losses


def test_accumulation_equals_one_large_batch(abstracts, tiny_gpt2):
    """4 × 2 micro-batches with token-normalised loss take exactly the step of one batch of 8."""
    model, tokenizer = tiny_gpt2
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    blocks = pack_blocks(tokenize_corpus(abstracts, tokenizer, objective="clm"), 32)
    objective = build_objective("clm", tokenizer)
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        train(trained, objective, BatchSampler(blocks, batch_size, seed=3), optimizer,
              LoopSettings(max_steps=2, grad_accum_steps=accum, max_grad_norm=None, log_every=1),
              device=torch.device("cpu"))
        results.append(trained.state_dict())
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def crash_then_resume(tmp_path, corpus, *, first_dir, second_dir, after_crash=lambda: None, **kwargs):
    """Pretrain 12 steps saving every 5, killed at step 8 in `first_dir`; `after_crash()`; rerun in `second_dir`.
    Returns (the first step the rerun logged, its checkpoint, an uninterrupted run's checkpoint)."""
    base = base_model(tmp_path, corpus)
    reference, _ = pretrain(tmp_path / "uninterrupted", corpus, base, max_steps=12, save_every=5, eval_every=0,
                            log_every=1)

    def crash(step, metrics):
        if step == 8:
            raise KeyboardInterrupt("killed")

    config = PretrainConfig(block_size=32, batch_size=8, max_steps=12, lr=3e-3, log_every=1, save_every=5,
                            eval_every=0)
    kwargs |= dict(base=base, train_data=corpus.train, validation_data=corpus.validation,
                   cache_dir=tmp_path / "cache", seed=0)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(config, log_metrics=crash, work_dir=first_dir, **kwargs)
    assert not list(first_dir.glob("pretrain-*/final")), "no final checkpoint after a crash"
    after_crash()
    steps = []
    resumed = run_pretrain(config, log_metrics=lambda step, m: "loss" in m and steps.append(step),
                           work_dir=second_dir, **kwargs)
    return steps[0], resumed, reference


def assert_same_weights(ours, theirs):
    ours, theirs = load_file(f"{ours.uri}/model.safetensors"), load_file(f"{theirs.uri}/model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_killed_stage_resumes_exactly_where_it_stopped(tmp_path, corpus):
    stages = tmp_path / "stages"
    first_step, resumed, reference = crash_then_resume(tmp_path, corpus, first_dir=stages, second_dir=stages)
    assert first_step == 6, "resumed after the last saved step (5), not from zero"
    assert_same_weights(resumed, reference)


def test_a_stage_whose_machine_was_lost_resumes_from_its_s3_mirror(tmp_path, corpus, s3_env, s3_client):
    """Saves are copied to `checkpoint_mirror` (S3 here); a rerun with an empty local workdir fetches the
    latest one and ends with the weights of an unbroken run."""
    def mirrored() -> list[str]:
        return [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_env)["Contents"] if not o["Key"].endswith("/")]

    def only_step_5_is_mirrored():
        keys = mirrored()
        assert {k.split("/")[2] for k in keys} == {"step-0000005"} and any(k.endswith("trainer_state.json")
                                                                          for k in keys)

    first_step, resumed, reference = crash_then_resume(
        tmp_path, corpus, first_dir=tmp_path / "machine-a", second_dir=tmp_path / "machine-b",
        after_crash=only_step_5_is_mirrored, checkpoint_mirror=f"s3://{s3_env}/resume")
    assert first_step == 6, "resumed after the mirrored save (step 5), not from zero"
    assert_same_weights(resumed, reference)
    assert {k.split("/")[2] for k in mirrored()} == {"step-0000010"}, "older saves are pruned on the mirror"


def test_head_warmup_trains_the_head_alone_first(abstracts, tiny_bert):
    model, tokenizer = copy.deepcopy(tiny_bert[0]), tiny_bert[1]
    config = PretrainConfig(block_size=32, batch_size=4, max_steps=20, head_warmup_steps=3, lr=1e-3, head_lr=1e-2)
    optimizer, freeze = _optimizer_and_freezing(model, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = pack_blocks(tokenize_corpus(abstracts, tokenizer, objective="mlm"), 32)
    train(model, build_objective("mlm", tokenizer), BatchSampler(blocks, 4, 0), optimizer,
          LoopSettings(max_steps=3, log_every=1), device=torch.device("cpu"), step_hooks=[freeze])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("cls.") for k in changed), changed
    assert "bert.embeddings.word_embeddings.weight" not in changed


def test_non_finite_loss_stops_training_with_the_step(abstracts, tiny_gpt2):
    model, tokenizer = copy.deepcopy(tiny_gpt2[0]), tiny_gpt2[1]
    blocks = pack_blocks(tokenize_corpus(abstracts, tokenizer, objective="clm"), 32)
    clm = build_objective("clm", tokenizer)

    class Exploding:
        name = "clm"
        collate = staticmethod(clm.collate)

        @staticmethod
        def loss(model, batch):
            return clm.loss(model, batch) * float("nan")

    with pytest.raises(TrainingError, match=r"loss became nan between steps 1 and 2"):
        train(model, Exploding(), BatchSampler(blocks, 4, 0), torch.optim.SGD(model.parameters(), lr=0.1),
              LoopSettings(max_steps=10, log_every=2), device=torch.device("cpu"))


def test_too_little_data_for_one_batch_is_a_clear_error(abstracts, tiny_gpt2):
    from adaptflow.errors import DataError

    blocks = torch.zeros(3, 32, dtype=torch.long)
    with pytest.raises(DataError, match="only 3 training item"):
        BatchSampler(blocks, 8, 0)


def test_the_loop_logs_model_flops_and_mfu_against_a_declared_peak(abstracts, tiny_bert, monkeypatch):
    from adaptflow.flops import model_shape

    model, tokenizer = copy.deepcopy(tiny_bert[0]), tiny_bert[1]
    blocks = pack_blocks(tokenize_corpus(abstracts, tokenizer, objective="mlm"), 32)
    logged = []
    monkeypatch.setenv("ADAPTFLOW_PEAK_TFLOPS", "0.002")  # a 2 GFLOP/s "device": MFU is logged on the CPU too
    train(model, build_objective("mlm", tokenizer), BatchSampler(blocks, 4, 0),
          torch.optim.AdamW(model.parameters(), lr=1e-3), LoopSettings(max_steps=4, log_every=2),
          device=torch.device("cpu"), log_metrics=lambda step, metrics: logged.append(metrics))

    parameters, layers, hidden = model_shape(model)
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert parameters == sum(p.numel() for p in model.parameters()) - embeddings and (layers, hidden) == (2, 32)
    per_token = 6 * parameters + 12 * layers * hidden * 32  # 6N + 12·L·H·T over packed 32-token blocks
    for metrics in logged:
        assert metrics["model_tflops"] * 1e12 / metrics["tokens_per_s"] == pytest.approx(per_token, rel=1e-9)
        assert metrics["mfu"] == pytest.approx(metrics["model_tflops"] / 0.002)
    monkeypatch.delenv("ADAPTFLOW_PEAK_TFLOPS")
    logged.clear()
    train(model, build_objective("mlm", tokenizer), BatchSampler(blocks, 4, 0),
          torch.optim.AdamW(model.parameters(), lr=1e-3), LoopSettings(max_steps=2, log_every=2),
          device=torch.device("cpu"), log_metrics=lambda step, metrics: logged.append(metrics))
    assert "mfu" not in logged[0] and logged[0]["model_tflops"] > 0  # no known peak for a CPU: no MFU
