"""Continued domain pretraining (DAPT/TAPT): masked LM for encoders, causal LM for decoders.

    pretrain.run(Config(...), Inputs(base=..., train=..., validation=..., replay=...), env) -> Result

Documents are read from the token store (tokenised once, memory-mapped: `adaptflow.data.tokens`) and packed into
full blocks (no padding) that keep their document boundaries (`packing.isolate_documents`: attention stays inside
each document); general text ("replay") against forgetting is a second stream interleaved at its ratio
(`adaptflow.data.blocks`). A head that starts untrained (the packaged MiniLM has no MLM head) can damage the encoder before
it learns anything, so `head_warmup_steps` trains the head alone on a frozen encoder first, at `head_lr`.
A run interrupted after a periodic save (`save_every`) resumes from it when run again with the same inputs
(same cache key), replaying exactly the steps an uninterrupted run would have taken; with a checkpoint mirror
(an `s3://` URI or a path) each save is copied there too, and a run that finds no local save resumes from the
mirror's.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from adaptflow import storage
from adaptflow.config.base import CorpusName, NonNegativeInt, PositiveInt, Probability, Section
from adaptflow.config.optimization import EvalEvery, Optimization
from adaptflow.data.blocks import BlockSampler, PackedBlocks, Packing
from adaptflow.data.tokens import store_key
from adaptflow.errors import ConfigError
from adaptflow.evaluation.perplexity import perplexity
from adaptflow.lineage import stage_cache_key, stage_lineage
from adaptflow.models.checkpoints import checkpoint_parameter_names, infer_objective, load_model, save_checkpoint
from adaptflow.objectives import build_objective
from adaptflow.objectives.mlm import split_mlm_head
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.stages.contract import Contribution, StageEnv
from adaptflow.train import adamw, loop_settings, make_engine, param_groups, train
from adaptflow.train.checkpointing import fetch_state, latest_training_state, mirror_state, state_dir

log = logging.getLogger(__name__)
NAME = "pretrain"
DISTRIBUTED = True
REUSABLE = True


class ReplayConfig(Section):
    """Mix general text into pretraining against forgetting: `ratio` of the training blocks come from it."""

    corpus: CorpusName
    ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1


class Config(Optimization):
    """Continued domain pretraining (DAPT/TAPT): masked LM for encoders, causal LM for decoders."""

    enabled: bool = True
    corpus: CorpusName = "domain"
    objective: Literal["auto", "mlm", "clm"] = "auto"
    mlm_probability: Probability = 0.15
    whole_word_masking: bool = False
    block_size: Annotated[int, Field(ge=8)] = 128
    batch_size: PositiveInt = 16
    max_steps: PositiveInt = 200
    lr: Annotated[float, Field(gt=0)] = 1e-4
    head_warmup_steps: NonNegativeInt = 0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.06
    eval_every: EvalEvery = 50
    eval_max_blocks: PositiveInt = 64
    replay: ReplayConfig | None = None
    packing: Packing = Packing()

    @model_validator(mode="after")
    def _head_warmup_fits(self) -> Config:
        if self.head_warmup_steps >= self.max_steps:
            raise ValueError(
                f"head_warmup_steps ({self.head_warmup_steps}) must be < max_steps ({self.max_steps}), "
                "or the encoder never trains"
            )
        return self


@dataclass(frozen=True)
class Inputs(Record):
    base: CheckpointRef
    train: DatasetRef
    validation: DatasetRef | None = None  # held-out blocks for the perplexity monitor
    replay: DatasetRef | None = None  # general text mixed in at `replay.ratio`


@dataclass(frozen=True)
class Result(Record):
    checkpoint: CheckpointRef
    # Held-out `eval_loss`/`eval_perplexity` of the output and, from a run that started at step 0 with
    # evaluation on, of the input (`*_start`): what the stage added.
    metrics: dict[str, float] = field(default_factory=dict)


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, seed)


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    """Continue pretraining `inputs.base` on `inputs.train`; write `<work_dir>/pretrain-<key>/final`.

    Under a launcher every rank calls this; `env.deepspeed` runs the loop under ZeRO. Rank 0 alone logs and writes
    checkpoints. `env.resume=False` starts from step 0 and drops the local saves (a forced recompute).
    """
    runtime, seed = env.runtime, env.seed
    key = cache_key(config, inputs, seed)
    stage_dir = env.stage_dir(NAME, key)
    objective_name = infer_objective(inputs.base.uri) if config.objective == "auto" else config.objective

    model, tokenizer = load_model(inputs.base, objective_name, seed=seed, trust_remote_code=env.trust_remote_code)
    objective = build_objective(
        objective_name, tokenizer, mlm_probability=config.mlm_probability, whole_word_masking=config.whole_word_masking
    )
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions and config.block_size > max_positions:
        raise ConfigError(
            f"stages.pretrain.block_size ({config.block_size}) exceeds the model's "
            f"max_position_embeddings ({max_positions}); lower block_size"
        )

    isolate = config.packing.isolates(objective_name)
    store = env.token_store

    def blocks_of(ref: DatasetRef) -> PackedBlocks:
        if runtime.is_main:  # a build has tokenised it already (mapped tasks); a direct call does it here
            store.build(ref, tokenizer, objective_name)
        runtime.barrier()
        corpus = store.open(store_key(ref.digest, tokenizer, objective_name))
        return PackedBlocks(corpus, config.block_size, isolate_documents=isolate)

    domain = blocks_of(inputs.train)
    streams = [(domain, 1.0)]
    if inputs.replay is not None and config.replay is not None and config.replay.ratio > 0:
        streams = [(domain, 1 - config.replay.ratio), (blocks_of(inputs.replay), config.replay.ratio)]
    validation = inputs.validation if inputs.validation is not None and inputs.validation.rows else None
    eval_blocks = blocks_of(validation).head(config.eval_max_blocks) if validation is not None else None
    if eval_blocks is not None and len(eval_blocks) == 0:
        log.warning("validation split of %s is shorter than one block: no held-out evaluation", inputs.train.name)
        eval_blocks = None
    sampler = BlockSampler(streams, config.batch_size, seed)
    env.metrics(0, {
        "domain_blocks": len(domain),
        "replay_blocks": len(streams[1][0]) if len(streams) > 1 else 0,
        "eval_blocks": 0 if eval_blocks is None else len(eval_blocks),
        "train_tokens": sum(blocks.tokens for blocks, _ in streams),
        "epochs": config.max_steps * config.grad_accum_steps * runtime.world_size / sampler.per_epoch,
        "isolate_documents": float(isolate),
    })

    device = runtime.device()
    model.to(device)
    optimizer, freeze = _optimizer_and_freezing(model, config)
    engine = make_engine(model, optimizer, runtime, config, micro_batch_size=config.batch_size,
                         deepspeed=env.deepspeed)
    start_step = 0
    states = stage_dir / "checkpoints"
    mirror = storage.join(env.checkpoint_mirror, stage_dir.name) if env.checkpoint_mirror else None
    if not env.resume and runtime.is_main:
        shutil.rmtree(states, ignore_errors=True)
    elif mirror and runtime.is_main:
        fetch_state(states, mirror)
    runtime.barrier()
    if env.resume and (latest := latest_training_state(states)) is not None:
        start_step = engine.load_state(latest)
        log.info("resuming %s from %s (step %d of %d)", NAME, latest, start_step, config.max_steps)

    def save_state(step: int) -> None:
        engine.save_state(states, step, tokenizer)
        if mirror and runtime.is_main:
            mirror_state(state_dir(states, step), mirror)

    def evaluate() -> dict[str, float]:
        result = perplexity(model, objective, eval_blocks, batch_size=config.batch_size, device=device,
                            bf16=config.bf16)
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}

    settings = loop_settings(config, max_steps=config.max_steps, seed=seed, evaluates=eval_blocks is not None,
                             steps_per_epoch=sampler.per_epoch // config.grad_accum_steps, progress=env.progress,
                             description=NAME, eval_at_start=True)
    result = train(model, objective, sampler, optimizer, settings, device=device, start_step=start_step,
                   step_hooks=[freeze] if freeze else [], evaluate=evaluate if eval_blocks is not None else None,
                   save_state=save_state, log_metrics=env.metrics, runtime=runtime, engine=engine)
    log.info("%s: %d steps, %.0f tokens/s", NAME, result.steps, result.tokens / max(result.seconds, 1e-9))

    lineage = stage_lineage(NAME, config=config.model_dump(mode="json") | {"seed": seed, "objective": objective_name},
                            cache_key=key, inputs=inputs, mlflow_run_id=env.mlflow_run_id,
                            build_run_id=env.build_run_id)
    final = stage_dir / "final"
    digest = ""
    with engine.full_parameters():
        if runtime.is_main:
            digest = save_checkpoint(model.cpu(), tokenizer, final, lineage=lineage)
    runtime.barrier()
    metrics = dict(result.eval_metrics) | {f"{k}_start": v for k, v in result.start_metrics.items()}
    metrics["input_head_trained"] = float(_head_trained(model, inputs.base))
    return Result(CheckpointRef(uri=str(final), digest=digest, stage=NAME, mlflow_run_id=env.mlflow_run_id),
                  metrics=metrics)


def contribution(config: Config, result: Result) -> Contribution | None:
    """Held-out perplexity on the stage's corpus, of the input and of the output (lower is better). An input
    whose LM head is untrained (the packaged MiniLM's) has no meaningful perplexity: no "before" then."""
    metrics = result.metrics
    if "eval_perplexity" not in metrics:
        return None
    before = metrics.get("eval_perplexity_start") if metrics.get("input_head_trained") else None
    return Contribution(f"{config.corpus} held-out perplexity", before, metrics["eval_perplexity"],
                        higher_is_better=False)


def _head_trained(model: torch.nn.Module, base: CheckpointRef) -> bool:
    """Whether `base` holds every weight of `model`'s LM head (tied weights count: they are the embeddings)."""
    _, head = split_mlm_head(model)
    if head is None:
        return True
    head_ids = {id(p) for p in head.parameters()}
    stored = checkpoint_parameter_names(model, base.uri)
    return all(name in stored for name, p in model.named_parameters() if id(p) in head_ids)


def _optimizer_and_freezing(model: torch.nn.Module, config: Config):
    """AdamW with the head in its own group (own lr; trains from step 0) and the encoder starting after the
    head warm-up. No weight decay on biases and norms. Returns (optimizer, step hook that unfreezes)."""
    _, head = split_mlm_head(model)
    tied = {id(model.get_input_embeddings().weight)}
    head_params = [] if head is None else [p for p in head.parameters() if id(p) not in tied]
    head_ids = {id(p) for p in head_params}
    encoder_params = [p for p in model.parameters() if id(p) not in head_ids]

    warmup = config.head_warmup_steps if head_params else 0
    encoder = param_groups(encoder_params, config.lr, config.weight_decay, "encoder")
    groups = [group | {"start_step": warmup} for group in encoder]
    if head_params:
        groups += param_groups(head_params, config.head_lr or config.lr, config.weight_decay, "head")
    optimizer = adamw(groups, lr=config.lr)

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
