"""The pretraining stage on tiny models: learning happens, the checkpoint loads with plain transformers, a killed
stage resumes exactly (locally and from an S3 mirror), and the head warms up alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from adaptflow.config import ModelConfig, TinyModelConfig
from adaptflow.data.blocks import BlockSampler
from adaptflow.data.corpus import load_texts, prepare_corpus
from adaptflow.models import checkpoint_digest, materialize_base_model
from adaptflow.objectives import build_objective
from adaptflow.refs import CheckpointRef
from adaptflow.stages import StageEnv
from adaptflow.stages import pretrain as stage
from adaptflow.stages.pretrain import Config as PretrainConfig
from adaptflow.stages.pretrain import _optimizer_and_freezing
from adaptflow.train import LoopSettings, train
from tests.conftest import DATA_ROOT, pack_texts

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
    inputs = stage.Inputs(base=base, train=corpus.train, validation=corpus.validation)
    env = StageEnv(work_dir=tmp_path / "stages", cache_dir=tmp_path / "cache", seed=0,
                   log_metrics=lambda step, m: history.append((step, m)))
    return stage.run(config, inputs, env).checkpoint, history


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
    inputs = stage.Inputs(base=base, train=corpus.train, validation=corpus.validation)
    with pytest.raises(KeyboardInterrupt):
        stage.run(config, inputs, StageEnv(work_dir=first_dir, cache_dir=tmp_path / "cache", log_metrics=crash,
                                           **kwargs))
    assert not list(first_dir.glob("pretrain-*/final")), "no final checkpoint after a crash"
    after_crash()
    steps = []
    resumed = stage.run(config, inputs, StageEnv(work_dir=second_dir, cache_dir=tmp_path / "cache", **kwargs,
                                                 log_metrics=lambda step, m: "loss" in m and steps.append(step)))
    return steps[0], resumed.checkpoint, reference


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


def test_head_warmup_trains_the_head_alone_first(abstracts, tiny_bert, tmp_path):
    model, tokenizer = copy.deepcopy(tiny_bert[0]), tiny_bert[1]
    config = PretrainConfig(block_size=32, batch_size=4, max_steps=20, head_warmup_steps=3, lr=1e-3, head_lr=1e-2)
    optimizer, freeze = _optimizer_and_freezing(model, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = pack_texts(abstracts, tokenizer, "mlm", 32, tmp_path)
    train(model, build_objective("mlm", tokenizer), BlockSampler([(blocks, 1.0)], 4, 0), optimizer,
          LoopSettings(max_steps=3, log_every=1), device=torch.device("cpu"), step_hooks=[freeze])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("cls.") for k in changed), changed
    assert "bert.embeddings.word_embeddings.weight" not in changed


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])
def test_the_stage_reports_held_out_perplexity_before_and_after_as_its_contribution(tmp_path, corpus, architecture):
    base = base_model(tmp_path, corpus, architecture)
    config = PretrainConfig(block_size=32, batch_size=8, max_steps=20, lr=3e-3, eval_every=10, eval_max_blocks=8,
                            corpus="domain")
    result = stage.run(config, stage.Inputs(base=base, train=corpus.train, validation=corpus.validation),
                       StageEnv(work_dir=tmp_path / "stages", seed=0))
    metrics = result.metrics
    assert metrics["input_head_trained"] == 1.0  # a tiny model saves its head (GPT-2's is the tied embeddings)
    contribution = stage.contribution(config, result)
    assert contribution.before == metrics["eval_perplexity_start"] > contribution.after == metrics["eval_perplexity"]
    assert contribution.gain == pytest.approx(contribution.before - contribution.after) and contribution.gain > 0


def test_an_input_without_a_trained_mlm_head_has_no_before(tmp_path, corpus):
    """A sentence-embedding checkpoint (a bare encoder, as the packaged MiniLM) has no MLM head: its step-0
    perplexity is a random head's, so it is no "before"."""
    base = base_model(tmp_path, corpus)
    encoder = AutoModel.from_pretrained(base.uri)  # drops the MLM head
    encoder.save_pretrained(tmp_path / "encoder")
    AutoTokenizer.from_pretrained(base.uri).save_pretrained(tmp_path / "encoder")
    bare = CheckpointRef(uri=str(tmp_path / "encoder"), digest=checkpoint_digest(tmp_path / "encoder"), stage="base")
    config = PretrainConfig(block_size=32, batch_size=8, max_steps=4, eval_every=2, eval_max_blocks=4,
                            corpus="domain")
    result = stage.run(config, stage.Inputs(base=bare, train=corpus.train, validation=corpus.validation),
                       StageEnv(work_dir=tmp_path / "stages", seed=0))
    assert result.metrics["input_head_trained"] == 0.0 and "eval_perplexity_start" in result.metrics
    contribution = stage.contribution(config, result)
    assert contribution.before is None and contribution.gain is None


def test_a_resumed_stage_reads_exactly_the_micro_batches_of_an_unbroken_run(tmp_path, corpus, monkeypatch):
    """Killed mid-epoch at step 8 (last save at 5) with replay mixed in and documents isolated, the rerun reads
    micro-batches 5.. again and nothing else: the batch digests and the final weights of an unbroken run."""
    import hashlib

    from adaptflow.data.blocks import BlockSampler

    read: list[tuple[int, str]] = []
    real = BlockSampler.__call__

    def recording(self, index):
        batch = real(self, index)
        read.append((index, hashlib.sha256(batch.input_ids.numpy().tobytes() +
                                           batch.documents.numpy().tobytes()).hexdigest()))
        return batch

    monkeypatch.setattr(BlockSampler, "__call__", recording)
    base = base_model(tmp_path, corpus)
    config = PretrainConfig(block_size=32, batch_size=8, max_steps=12, lr=3e-3, log_every=1, save_every=5,
                            eval_every=0, grad_accum_steps=2, replay={"corpus": "general", "ratio": 0.25},
                            packing={"isolate_documents": True})
    inputs = stage.Inputs(base=base, train=corpus.train, validation=corpus.validation, replay=corpus.validation)

    def env(work, log_metrics=None):
        return StageEnv(work_dir=tmp_path / work, cache_dir=tmp_path / "cache", log_metrics=log_metrics)

    unbroken = stage.run(config, inputs, env("unbroken")).checkpoint
    expected, read[:] = list(read), []

    def crash(step, metrics):
        if step == 8:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        stage.run(config, inputs, env("broken", crash))
    before_crash, read[:] = list(read), []
    resumed = stage.run(config, inputs, env("broken")).checkpoint
    assert [i for i, _ in expected] == list(range(24)) and before_crash == expected[:16]
    assert read == expected[10:], "the rerun starts at step 5's first micro-batch (10) and reads each once"
    assert_same_weights(resumed, unbroken)
