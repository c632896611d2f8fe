"""Continued domain pretraining (DAPT/TAPT): masked LM for encoders, causal LM for decoders.

    run_pretrain(config, base=..., train=..., validation=..., replay=..., work_dir=...) -> CheckpointRef

Documents are packed into full blocks (no padding), optionally mixed with general text ("replay") against
forgetting. A head that starts untrained (the packaged MiniLM has no MLM head) can damage the encoder before
it learns anything, so `head_warmup_steps` trains the head alone on a frozen encoder first, at `head_lr`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from adaptflow import storage
from adaptflow.checkpointing import fetch_state, latest_training_state, mirror_state, state_dir
from adaptflow.config import PretrainConfig
from adaptflow.data import load_texts
from adaptflow.distributed import SINGLE, DeepSpeedEngine, Runtime, TorchEngine
from adaptflow.errors import ConfigError
from adaptflow.evaluate import perplexity
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.models import infer_objective, load_model, save_checkpoint
from adaptflow.objectives import build_objective
from adaptflow.objectives.mlm import split_mlm_head
from adaptflow.refs import CheckpointRef, DatasetRef
from adaptflow.tokenize import mix_replay, pack_blocks, tokenize_corpus
from adaptflow.train import BatchSampler, LoopSettings, MetricsSink, adamw, train

log = logging.getLogger(__name__)
STAGE = "pretrain"


def pretrain_cache_key(config: PretrainConfig, base: CheckpointRef, datasets: list[DatasetRef], seed: int) -> str:
    return stage_cache_key(STAGE, {**config.model_dump(mode="json"), "seed": seed}, base.digest, datasets)


def run_pretrain(
    config: PretrainConfig,
    *,
    base: CheckpointRef,
    train_data: DatasetRef,
    validation_data: DatasetRef | None,
    replay_data: DatasetRef | None = None,
    work_dir: str | Path,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    mlflow_run_id: str | None = None,
    build_run_id: str | None = None,
    log_metrics: MetricsSink | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    runtime: Runtime = SINGLE,
    deepspeed: str | dict | None = None,
    checkpoint_mirror: str | None = None,
    resume: bool = True,
) -> CheckpointRef:
    """Continue pretraining `base` on `train_data`; write `work_dir/pretrain-<key>/final` and return its ref.

    A run interrupted after a periodic save (`save_every`) resumes from it when called again with the
    same inputs (same cache key), replaying exactly the steps an uninterrupted run would have taken.

    With `checkpoint_mirror` (an `s3://` URI or a path) each periodic save is copied there too, and a run
    that finds no local save resumes from the mirror's. `resume=False` starts from step 0 and drops the local
    saves (a forced recompute).

    Under a launcher every rank calls this; `deepspeed` (a DeepSpeed JSON config) runs the loop under ZeRO.
    Rank 0 alone logs and writes checkpoints.
    """
    log_metrics = log_metrics or (lambda step, metrics: None)
    datasets = [d for d in (train_data, validation_data, replay_data) if d is not None]
    key = pretrain_cache_key(config, base, datasets, seed)
    stage_dir = Path(work_dir) / f"{STAGE}-{key}"
    objective_name = infer_objective(base.uri) if config.objective == "auto" else config.objective

    model, tokenizer = load_model(base, objective_name, seed=seed, trust_remote_code=trust_remote_code)
    objective = build_objective(
        objective_name, tokenizer, mlm_probability=config.mlm_probability, whole_word_masking=config.whole_word_masking
    )
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions and config.block_size > max_positions:
        raise ConfigError(
            f"stages.pretrain.block_size ({config.block_size}) exceeds the model's "
            f"max_position_embeddings ({max_positions}); lower block_size"
        )

    def blocks_of(ref: DatasetRef) -> torch.Tensor:
        corpus = tokenize_corpus(
            load_texts(ref), tokenizer, objective=objective_name, cache_dir=cache_dir, dataset_digest=ref.digest
        )
        return pack_blocks(corpus, config.block_size)

    domain_blocks = blocks_of(train_data)
    blocks = domain_blocks
    if replay_data is not None and config.replay is not None:
        blocks = mix_replay(domain_blocks, blocks_of(replay_data), config.replay.ratio, seed=seed)
    eval_blocks = blocks_of(validation_data)[: config.eval_max_blocks] if validation_data is not None else None
    if eval_blocks is not None and len(eval_blocks) == 0:
        log.warning("validation split of %s is shorter than one block: no held-out evaluation", train_data.name)
        eval_blocks = None
    sampler = BatchSampler(blocks, config.batch_size, seed)
    log_metrics(0, {
        "domain_blocks": len(domain_blocks),
        "replay_blocks": len(blocks) - len(domain_blocks),
        "eval_blocks": 0 if eval_blocks is None else len(eval_blocks),
        "train_tokens": blocks.numel(),
        "epochs": config.max_steps * config.grad_accum_steps / sampler.per_epoch,
    })

    device = runtime.device()
    model.to(device)
    optimizer, freeze = _optimizer_and_freezing(model, config)
    if deepspeed is not None:
        engine = DeepSpeedEngine(model, optimizer, runtime, config=deepspeed, micro_batch_size=config.batch_size,
                                 grad_accum_steps=config.grad_accum_steps, max_grad_norm=config.max_grad_norm,
                                 bf16=config.bf16)
    else:
        engine = TorchEngine(model, optimizer, runtime, max_grad_norm=config.max_grad_norm)
    start_step = 0
    states = stage_dir / "checkpoints"
    mirror = storage.join(checkpoint_mirror, stage_dir.name) if checkpoint_mirror else None
    if not resume and runtime.is_main:
        shutil.rmtree(states, ignore_errors=True)
    elif mirror and runtime.is_main:
        fetch_state(states, mirror)
    runtime.barrier()
    if resume and (latest := latest_training_state(states)) is not None:
        start_step = engine.load_state(latest)
        log.info("resuming %s from %s (step %d of %d)", STAGE, latest, start_step, config.max_steps)

    def save_state(step: int) -> None:
        engine.save_state(states, step, tokenizer)
        if mirror and runtime.is_main:
            mirror_state(state_dir(states, step), mirror)

    def evaluate() -> dict[str, float]:
        result = perplexity(model, objective, eval_blocks, batch_size=config.batch_size, device=device, bf16=config.bf16)
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}

    result = train(
        model,
        objective,
        sampler,
        optimizer,
        LoopSettings(
            max_steps=config.max_steps,
            grad_accum_steps=config.grad_accum_steps,
            max_grad_norm=config.max_grad_norm,
            bf16=config.bf16,
            schedule=config.schedule,
            warmup_ratio=config.warmup_ratio,
            log_every=config.log_every,
            eval_every=config.eval_every if eval_blocks is not None else 0,
            save_every=config.save_every,
            seed=seed,
            progress=progress,
            description=STAGE,
        ),
        device=device,
        start_step=start_step,
        step_hooks=[freeze] if freeze else [],
        evaluate=evaluate if eval_blocks is not None else None,
        save_state=save_state,
        log_metrics=log_metrics if runtime.is_main else None,
        runtime=runtime,
        engine=engine,
    )
    log.info("%s: %d steps, %.0f tokens/s", STAGE, result.steps, result.tokens / max(result.seconds, 1e-9))

    lineage = stage_lineage(
        STAGE,
        config=config.model_dump(mode="json") | {"seed": seed, "objective": objective_name},
        cache_key=key,
        input_checkpoint=base,
        datasets=datasets,
        mlflow_run_id=mlflow_run_id,
        build_run_id=build_run_id,
    )
    final = stage_dir / "final"
    digest = ""
    with engine.full_parameters():
        if runtime.is_main:
            digest = save_checkpoint(model.cpu(), tokenizer, final, lineage=lineage)
    runtime.barrier()
    return CheckpointRef(uri=str(final), digest=digest, stage=STAGE, mlflow_run_id=mlflow_run_id)


def _optimizer_and_freezing(model: torch.nn.Module, config: PretrainConfig):
    """AdamW with the head in its own group (own lr; trains from step 0) and the encoder starting after the
    head warm-up. No weight decay on biases and norms. Returns (optimizer, step hook that unfreezes)."""
    _, head = split_mlm_head(model)
    tied = {id(model.get_input_embeddings().weight)}
    head_params = [] if head is None else [p for p in head.parameters() if id(p) not in tied]
    head_ids = {id(p) for p in head_params}
    encoder_params = [p for p in model.parameters() if id(p) not in head_ids]

    def groups(params, lr, name, start_step=0):
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        common = {"lr": lr, "name": name, "start_step": start_step}
        return [
            {"params": decay, "weight_decay": config.weight_decay, **common},
            {"params": no_decay, "weight_decay": 0.0, **common},
        ]

    warmup = config.head_warmup_steps if head_params else 0
    param_groups = groups(encoder_params, config.lr, "encoder", start_step=warmup)
    if head_params:
        param_groups += groups(head_params, config.head_lr or config.lr, "head")
    param_groups = [g for g in param_groups if g["params"]]
    optimizer = adamw(param_groups, lr=config.lr)

    if not warmup:
        return optimizer, None

    def freeze(step: int) -> None:
        trainable = step >= warmup
        if encoder_params[0].requires_grad != trainable:
            for p in encoder_params:
                p.requires_grad_(trainable)
            if trainable:
                log.info("head warm-up done at step %d: the encoder trains from now on", step)

    return optimizer, freeze
