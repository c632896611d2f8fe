"""The one training loop on tiny models: token-normalised accumulation equals one large batch, a non-finite loss
stops training with its step, too little data is a clear error, and model FLOPs and MFU are logged."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptflow.data.blocks import BlockSampler
from adaptflow.errors import TrainingError
from adaptflow.objectives import build_objective
from adaptflow.train import BatchSampler, LoopSettings, train
from tests.conftest import pack_texts


def test_accumulation_equals_one_large_batch(abstracts, tiny_gpt2, tmp_path):
    """4 × 2 micro-batches with token-normalised loss take exactly the step of one batch of 8."""
    model, tokenizer = tiny_gpt2
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    blocks = pack_texts(abstracts, tokenizer, "clm", 32, tmp_path)
    objective = build_objective("clm", tokenizer)
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        train(trained, objective, BlockSampler([(blocks, 1.0)], batch_size, seed=3), optimizer,
              LoopSettings(max_steps=2, grad_accum_steps=accum, max_grad_norm=None, log_every=1),
              device=torch.device("cpu"))
        results.append(trained.state_dict())
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_loss_stops_training_with_the_step(abstracts, tiny_gpt2, tmp_path):
    model, tokenizer = copy.deepcopy(tiny_gpt2[0]), tiny_gpt2[1]
    blocks = pack_texts(abstracts, tokenizer, "clm", 32, tmp_path)
    clm = build_objective("clm", tokenizer)

    class Exploding:
        name = "clm"
        collate = staticmethod(clm.collate)

        @staticmethod
        def loss(model, batch):
            return clm.loss(model, batch) * float("nan")

    with pytest.raises(TrainingError, match=r"loss became nan between steps 1 and 2"):
        train(model, Exploding(), BlockSampler([(blocks, 1.0)], 4, 0), torch.optim.SGD(model.parameters(), lr=0.1),
              LoopSettings(max_steps=10, log_every=2), device=torch.device("cpu"))


def test_too_little_data_for_one_batch_is_a_clear_error(abstracts, tiny_gpt2):
    from adaptflow.errors import DataError

    with pytest.raises(DataError, match="only 3 training item"):
        BatchSampler([{"input_ids": [1]}] * 3, 8, 0)


def test_the_loop_logs_model_flops_and_mfu_against_a_declared_peak(abstracts, tiny_bert, monkeypatch, tmp_path):
    from adaptflow.train.flops import model_shape

    model, tokenizer = copy.deepcopy(tiny_bert[0]), tiny_bert[1]
    blocks = pack_texts(abstracts, tokenizer, "mlm", 32, tmp_path)
    logged = []
    monkeypatch.setenv("ADAPTFLOW_PEAK_TFLOPS", "0.002")  # a 2 GFLOP/s "device": MFU is logged on the CPU too
    train(model, build_objective("mlm", tokenizer), BlockSampler([(blocks, 1.0)], 4, 0),
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
    train(model, build_objective("mlm", tokenizer), BlockSampler([(blocks, 1.0)], 4, 0),
          torch.optim.AdamW(model.parameters(), lr=1e-3), LoopSettings(max_steps=2, log_every=2),
          device=torch.device("cpu"), log_metrics=lambda step, metrics: logged.append(metrics))
    assert "mfu" not in logged[0] and logged[0]["model_tflops"] > 0  # no known peak for a CPU: no MFU
