"""Task fine-tuning on tiny models: every strategy learns, and each control does what it says."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from adaptflow import kinds
from adaptflow.config import DistributedConfig, ModelConfig, TaskDataConfig, TinyModelConfig
from adaptflow.data.corpus import read_texts
from adaptflow.data.labelled import prepare_task
from adaptflow.launch import launch_stage
from adaptflow.models import load_task_model, materialize_base_model, reinitialise_head, reinitialise_pooler
from adaptflow.refs import DatasetRef
from adaptflow.regularizers import AnchorPenalty
from adaptflow.stages import StageEnv
from adaptflow.stages import finetune as stage
from adaptflow.stages.finetune import Config as FinetuneConfig
from adaptflow.stages.finetune import Result as FinetuneResult
from adaptflow.stages.finetune import aggregate_seeds, choose_seed
from adaptflow.strategies import StrategySettings, apply_strategy, trainable_fraction
from adaptflow.train import EarlyStopping
from tests.conftest import DATA_ROOT, DOMAINS

CHEMPROT = DATA_ROOT / "biomedical/chemprot"
CHEMPROT_LABELS = ["ACTIVATOR", "AGONIST", "AGONIST-ACTIVATOR", "AGONIST-INHIBITOR", "ANTAGONIST",
                   "DOWNREGULATOR", "INDIRECT-DOWNREGULATOR", "INDIRECT-UPREGULATOR", "INHIBITOR", "PRODUCT-OF",
                   "SUBSTRATE", "SUBSTRATE_PRODUCT-OF", "UPREGULATOR"]


def tiny_base(tmp_path, architecture="bert", hidden=32, vocab=800):
    tiny = TinyModelConfig(architecture=architecture, hidden_size=hidden, num_layers=2, num_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=128, vocab_size=vocab)
    texts = read_texts(str(CHEMPROT / "train.jsonl"), max_rows=600) + read_texts(
        str(DATA_ROOT / "biomedical/ncbi_disease_ner/train.txt"), max_rows=400)
    return materialize_base_model(ModelConfig(tiny=tiny), out_dir=tmp_path / "models", tokenizer_texts=texts, seed=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def chemprot(tmp_path_factory):
    config = TaskDataConfig(type="classification", train=str(CHEMPROT / "train.jsonl"),
                            validation=str(CHEMPROT / "dev.jsonl"), test=str(CHEMPROT / "test.jsonl"),
                            labels=CHEMPROT_LABELS, max_examples=160)
    return prepare_task("chemprot", config, out_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ncbi(tmp_path_factory):
    ner = DATA_ROOT / "biomedical/ncbi_disease_ner"
    config = TaskDataConfig(type="ner", train=str(ner / "train.txt"), validation=str(ner / "dev.txt"),
                            test=str(ner / "test.txt"), format="conll", max_examples=160)
    return prepare_task("ncbi", config, out_dir=tmp_path_factory.mktemp("data"))


def finetune(tmp_path, task, base, **settings):
    config = FinetuneConfig(**{"task": "t", "max_steps": 24, "batch_size": 16, "lr": 3e-3, "log_every": 1,
                               "max_length": 64, "warmup_ratio": 0.0, "schedule": "constant", **settings})
    history = []
    result = stage.run(config, stage.Inputs(base=base, task=task),
                       StageEnv(work_dir=tmp_path / "stages", seed=1, log_metrics=lambda step, m: history.append(m)))
    losses = [m["loss"] for m in history if "loss" in m]
    return result, losses


def learned(losses):
    return sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


PEFT = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
STRATEGIES = [
    ("full", {}),
    ("lora", {"peft": PEFT, "lr": 1e-2}),
    ("adalora", {"peft": {"init_r": 8, "target_r": 4, "target_modules": ["query", "value"], "tinit": 4,
                          "tfinal": 8}, "lr": 1e-2}),
    ("gralora", {"peft": {"r": 8, "gralora_k": 2, "target_modules": ["query", "value"]}, "lr": 1e-2}),
    ("ia3", {"peft": {"target_modules": ["key", "value", "output.dense"],
                      "feedforward_modules": ["output.dense"]}, "lr": 3e-2}),
    ("adapters", {"adapter_reduction": 4, "lr": 1e-2}),
    ("feature_extraction", {"lr": 1e-2}),
    ("gradual_unfreezing", {"unfreeze_every": 6}),
]


@pytest.mark.parametrize("strategy,settings", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_every_strategy_learns_and_saves_a_loadable_checkpoint(tmp_path, chemprot, base, strategy, settings):
    result, losses = finetune(tmp_path, chemprot, base, strategy=strategy, **settings)
    assert learned(losses), losses
    assert {"test_accuracy", "test_micro_f1", "test_macro_f1", "val_macro_f1", "test_ece"} <= set(result.metrics)
    model, _ = load_task_model(result.checkpoint, "classification", CHEMPROT_LABELS)
    assert model.config.id2label[8] == "INHIBITOR"
    if strategy != "adapters":  # plain transformers loads everything but our adapter modules
        AutoModelForSequenceClassification.from_pretrained(result.checkpoint.uri)


def test_lora_trains_few_weights_and_saves_adapter_and_merged_model(tmp_path, chemprot):
    base = tiny_base(tmp_path, hidden=128, vocab=2000)
    model, _ = load_task_model(base, "classification", CHEMPROT_LABELS)
    strategy = apply_strategy(model, "lora", StrategySettings(kind=kinds.get("classification"), peft=PEFT))
    assert trainable_fraction(strategy.model) < 0.05

    result, _ = finetune(tmp_path, chemprot, base, strategy="lora", peft=PEFT, lr=1e-2, max_steps=6)
    final = result.checkpoint.uri
    assert (tmp_path / "stages").glob("*/final/adapter/adapter_model.safetensors").__next__()
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    from peft import PeftModel

    base_model = AutoModelForSequenceClassification.from_pretrained(base.uri, num_labels=len(CHEMPROT_LABELS))
    adapted = PeftModel.from_pretrained(base_model, f"{final}/adapter").eval()
    ids = AutoTokenizer.from_pretrained(final)(["the inhibitor binds the receptor"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, rtol=1e-4, atol=1e-5)


def test_feature_extraction_leaves_the_encoder_bit_for_bit_unchanged(tmp_path, chemprot, base):
    result, _ = finetune(tmp_path, chemprot, base, strategy="feature_extraction", lr=1e-2, max_steps=6)
    before, after = load_file(f"{base.uri}/model.safetensors"), load_file(f"{result.checkpoint.uri}/model.safetensors")
    encoder = [k for k in after if k in before]  # the pretrained weights (the pooler is new: it trains)
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(after["classifier.weight"],
                           load_task_model(base, "classification", CHEMPROT_LABELS, seed=1)[0].classifier.weight)


def test_gradual_unfreezing_opens_layer_groups_on_schedule(base):
    model, _ = load_task_model(base, "classification", CHEMPROT_LABELS)
    strategy = apply_strategy(model, "gradual_unfreezing", StrategySettings(kind=kinds.get("classification"),
                                                                            unfreeze_every=5))
    hook = strategy.step_hooks[0]

    def trainable():
        return {n.split(".")[3] if ".layer." in n else n.split(".")[1]
                for n, p in model.named_parameters() if p.requires_grad and n.startswith("bert.")}

    hook(0)
    assert trainable() == {"1"} and model.classifier.weight.requires_grad
    hook(5)
    assert trainable() == {"0", "1"}
    hook(10)
    assert trainable() >= {"0", "1", "embeddings"}


@pytest.mark.parametrize("kind", ["l2sp", "ewc"])
def test_regularisers_are_zero_at_the_start_and_positive_after_an_update(tmp_path, chemprot, base, kind):
    model, _ = load_task_model(base, "classification", CHEMPROT_LABELS)
    params = {n: p for n, p in model.named_parameters() if n.startswith("bert.")}
    importance = {n: torch.rand_like(p) for n, p in params.items()} if kind == "ewc" else None
    penalty = AnchorPenalty(params, 0.5, importance)
    assert penalty().item() == 0.0
    with torch.no_grad():
        next(iter(params.values())).add_(0.1)
    assert penalty().item() > 0.0

    result, losses = finetune(tmp_path, chemprot, base, regularizer={"type": kind, "strength": 1.0,
                                                                      "fisher_batches": 2}, max_steps=8)
    assert learned(losses)


def test_regulariser_logs_its_term_apart(tmp_path, chemprot, base):
    history = []
    config = FinetuneConfig(task="t", max_steps=6, batch_size=16, lr=3e-3, log_every=2, max_length=64,
                            regularizer={"type": "l2sp", "strength": 10.0})
    stage.run(config, stage.Inputs(base=base, task=chemprot),
              StageEnv(work_dir=tmp_path, seed=1, log_metrics=lambda s, m: history.append(m)))
    reg = [m["reg_loss"] for m in history if "reg_loss" in m]
    assert len(reg) == 3 and reg[-1] > 0


def test_early_stopping_halts_and_restores_the_best_weights():
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping("val_f1", mode="max", patience=2)
    scores = [0.5, 0.7, 0.6, 0.65]
    best = None
    for step, score in enumerate(scores):
        with torch.no_grad():
            model.weight.fill_(float(step))
        stop = stopper.update(step, {"val_f1": score}, model)
        if score == 0.7:
            best = model.weight.clone()
        if stop:
            break
    assert step == 3 and stopper.best == 0.7 and stopper.best_step == 1
    stopper.restore(model)
    assert torch.equal(model.weight, best)


def test_early_stopping_in_a_stage_stops_before_max_steps(tmp_path, chemprot, base):
    result, _ = finetune(tmp_path, chemprot, base, max_steps=60, lr=3e-2, eval_every=2,
                         early_stopping={"metric": "loss", "mode": "min", "patience": 1})
    assert result.metrics["steps"] < 60
    assert result.selection_metric == "loss"


def test_ner_fine_tuning_learns_and_reports_entity_f1(tmp_path, ncbi, base):
    result, losses = finetune(tmp_path, ncbi, base, max_steps=24)
    assert learned(losses)
    assert {"test_entity_f1", "test_precision", "test_recall", "val_entity_f1"} <= set(result.metrics)
    report = json.loads(next((tmp_path / "stages").glob("*/reports/test_report.json")).read_text())
    assert "Disease" in report["per_entity"]
    AutoModelForTokenClassification.from_pretrained(result.checkpoint.uri)


def test_sft_fine_tuning_learns(tmp_path):
    base = tiny_base(tmp_path, architecture="gpt2")
    rows = [{"prompt": f"Is {w} a disease?", "response": "yes" if i % 2 else "no"}
            for i, w in enumerate(["cancer", "aspirin", "asthma", "insulin", "anemia", "glucose"] * 20)]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = prepare_task("qa", TaskDataConfig(type="sft", train=str(path), validation_fraction=0.2),
                        out_dir=tmp_path / "data")
    result, losses = finetune(tmp_path, task, base, max_steps=20, batch_size=4, lr=3e-3)
    assert learned(losses)
    assert "val_loss" in result.metrics and result.selection_metric == "loss"


def test_seeds_are_aggregated_and_the_best_one_is_chosen(tmp_path, chemprot, base):
    from adaptflow.refs import CheckpointRef

    def result(seed, f1):
        ref = CheckpointRef(uri=f"/x/{seed}", digest="d", stage="finetune")
        return FinetuneResult(ref, seed, {"val_macro_f1": f1, "test_macro_f1": f1 - 0.1}, "macro_f1", "max")

    results = [result(1, 0.5), result(2, 0.7), result(3, 0.6)]
    summary = aggregate_seeds(results)
    assert summary["finetune.test_macro_f1_mean"] == pytest.approx(0.5)
    assert summary["finetune.test_macro_f1_std"] == pytest.approx(0.1)
    assert choose_seed(results, "best").seed == 2
    assert choose_seed(results, 3).seed == 3


def test_layerwise_lr_decay_gives_lower_layers_smaller_rates(base):
    from adaptflow.train.optim import layerwise_lr_groups

    model, _ = load_task_model(base, "classification", CHEMPROT_LABELS)
    groups = layerwise_lr_groups(model, lr=1e-3, decay=0.5, head_lr=1e-2, weight_decay=0.01)
    rate = {g["name"]: g["lr"] for g in groups}
    assert rate == {"layer0": 1e-3 * 0.25, "layer1": 1e-3 * 0.5, "layer2": 1e-3, "head": 1e-2}
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}
    embeddings = next(g for g in groups if g["name"] == "layer0")["params"]
    assert any(p is model.bert.embeddings.word_embeddings.weight for p in embeddings)


def test_layerwise_lr_decay_in_a_stage_learns(tmp_path, chemprot, base):
    _, losses = finetune(tmp_path, chemprot, base, layerwise_lr_decay=0.8)
    assert learned(losses)


def test_balanced_class_weights_and_sampler(tmp_path, chemprot, base):
    from collections import Counter

    from adaptflow.data.labelled import load_records
    from adaptflow.train import BatchSampler

    classification = kinds.get("classification")
    counts = Counter(r["label"] for r in load_records(chemprot.train))
    items = [{"label": CHEMPROT_LABELS.index(r["label"]), "input_ids": [1]} for r in load_records(chemprot.train)]
    objective = classification.objective(AutoTokenizer.from_pretrained(base.uri).pad_token_id, CHEMPROT_LABELS,
                                         balance_over=items)
    weights = objective.class_weights
    inhibitor, rare = CHEMPROT_LABELS.index("INHIBITOR"), CHEMPROT_LABELS.index("AGONIST")
    assert weights[rare] / weights[inhibitor] == pytest.approx(counts["INHIBITOR"] / counts["AGONIST"])

    sampler = BatchSampler(items, 16, seed=0, weights=classification.sample_weights(items))
    drawn = Counter(item["label"] for i in range(sampler.per_epoch * 4) for item in sampler(i))
    present = [CHEMPROT_LABELS.index(label) for label in counts]
    shares = [drawn[c] / sum(drawn.values()) for c in present]
    assert max(shares) < 2.5 * min(shares), shares  # roughly uniform over classes, unlike the data

    for settings in ({"class_weights": "balanced"}, {"sampler": "balanced"}):
        _, losses = finetune(tmp_path, chemprot, base, max_steps=48, **settings)
        assert learned(losses), (settings, losses)


def test_dropout_override_reaches_every_dropout_module(base):
    model, _ = load_task_model(base, "classification", CHEMPROT_LABELS, dropout=0.3)
    probabilities = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert probabilities == {0.3}


def test_weights_of_a_bare_encoder_checkpoint_count_as_pretrained():
    """The packaged MiniLM is a bare `BertModel` (`encoder.…`); a classifier names them `bert.encoder.…`.
    Mistaking them for new weights would train the whole encoder at the head's learning rate."""
    from adaptflow.models import checkpoint_parameter_names, packaged_model_path

    path = packaged_model_path("minilm")
    model, _ = load_task_model(path, "classification", ["no", "yes"])
    names = checkpoint_parameter_names(model, path)
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert "bert.embeddings.word_embeddings.weight" in names
    assert not any(n.startswith("classifier.") for n in names)


def test_a_lora_adapter_saved_under_zero3_on_two_ranks_equals_the_one_saved_without_it(tmp_path, chemprot, base):
    """ZeRO-3 leaves each rank a shard of every weight: saved naively, an adapter is empty or partial. The stage
    gathers before saving, so 2 ranks under ZeRO-3 save what 1 rank with twice the accumulation saves, and
    early stopping's restore-best (also gathered) brings back the same best step."""
    settings = {"task": "t", "max_steps": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1, "max_length": 64,
                "warmup_ratio": 0.0, "schedule": "constant", "dropout": 0.0, "strategy": "lora", "peft": PEFT,
                "eval_every": 2, "early_stopping": {"metric": "loss", "mode": "min", "patience": 10}}
    inputs = stage.Inputs(base=base, task=chemprot)
    plain = stage.run(FinetuneConfig(**settings, grad_accum_steps=2), inputs,
                      StageEnv(work_dir=tmp_path / "plain", seed=1))
    env = StageEnv(work_dir=tmp_path / "zero3", seed=1, deepspeed=str(DOMAINS.parent / "infra/deepspeed/zero3.json"))
    launched = launch_stage(stage, FinetuneConfig(**settings), inputs, env, job_dir=tmp_path / "job",
                            distributed=DistributedConfig(launcher="torchrun", nproc_per_node=2, omp_num_threads=1,
                                                          timeout_minutes=10))
    assert launched.world_size == 2
    zero3 = launched.result

    expected = load_file(f"{plain.checkpoint.uri}/adapter/adapter_model.safetensors")
    saved = load_file(f"{zero3.checkpoint.uri}/adapter/adapter_model.safetensors")
    assert saved.keys() == expected.keys() and any("lora_B" in k for k in saved)
    for name, tensor in expected.items():
        assert saved[name].shape == tensor.shape, name
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # trained: lora_B starts at zero
    assert zero3.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"], rel=1e-4)
    merged, merged_plain = (load_file(f"{r.checkpoint.uri}/model.safetensors") for r in (zero3, plain))
    for name, tensor in merged_plain.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_reinitialising_the_pooler_and_the_head_really_redraws_loaded_weights(tmp_path, base):
    """transformers marks loaded weights as initialised and its init functions skip them: the re-initialisation
    must clear those marks, or it silently keeps the checkpoint's weights."""
    model, _ = load_task_model(base, "classification", CHEMPROT_LABELS, seed=0)
    model.save_pretrained(tmp_path / "classifier")  # a checkpoint with a pooler and a head of its own
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    saved = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    names = reinitialise_pooler(loaded, seed=5)
    reinitialise_head(loaded, seed=5)
    assert names == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    now = dict(loaded.named_parameters())
    assert not torch.equal(now["bert.pooler.dense.weight"], saved["bert.pooler.dense.weight"])
    assert not torch.equal(now["classifier.weight"], saved["classifier.weight"])
    assert torch.equal(now["bert.encoder.layer.0.attention.self.query.weight"],
                       saved["bert.encoder.layer.0.attention.self.query.weight"])
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    reinitialise_head(again, seed=5)
    assert torch.equal(dict(again.named_parameters())["classifier.weight"], now["classifier.weight"])  # seeded


def test_the_ewc_fisher_corpus_is_part_of_the_cache_key(chemprot, base):
    config = FinetuneConfig(task="t", max_steps=4, regularizer={"type": "ewc", "fisher_corpus": "domain"})
    general = DatasetRef(uri="/data/general.parquet", digest="a" * 16, rows=10, name="general")
    other = dataclasses.replace(general, digest="b" * 16)
    key = stage.cache_key(config, stage.Inputs(base=base, task=chemprot, fisher=general), 1)
    assert key == stage.cache_key(config, stage.Inputs(base=base, task=chemprot, fisher=general), 1)
    assert key != stage.cache_key(config, stage.Inputs(base=base, task=chemprot, fisher=other), 1)
    assert key != stage.cache_key(config, stage.Inputs(base=base, task=chemprot), 1)
