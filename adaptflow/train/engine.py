"""The engine that applies the one training loop's gradients: plain torch or DeepSpeed, chosen in one place.

- `TorchEngine`: a plain torch optimizer; with several ranks the gradients are averaged by hand, one
  flattened all-reduce per optimizer step (exact, and nothing wraps the model).
- `DeepSpeedEngine`: `deepspeed.initialize` around the same model and optimizer, from a DeepSpeed JSON
  config (ZeRO stage 0–3, CPU offload, bf16). Micro-batch size, accumulation and clipping are always set
  from the recipe, so the JSON cannot silently disagree with the loop.

`make_engine` picks one from a stage's `Optimization` settings and the recipe's DeepSpeed config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from adaptflow.config.optimization import Optimization
from adaptflow.errors import ConfigError
from adaptflow.train.checkpointing import (
    load_training_state,
    partial_dir,
    read_state,
    safetensors_checkpoint_engine,
    save_training_state,
    seal,
)
from adaptflow.train.runtime import SINGLE, Runtime, free_port

log = logging.getLogger(__name__)


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, optim: Optimization, *,
                micro_batch_size: int, deepspeed: str | dict | None) -> TorchEngine | DeepSpeedEngine:
    """DeepSpeed (ZeRO) when the recipe names a DeepSpeed config, plain torch otherwise."""
    if deepspeed is None:
        return TorchEngine(model, optimizer, runtime, max_grad_norm=optim.max_grad_norm)
    return DeepSpeedEngine(model, optimizer, runtime, config=deepspeed, micro_batch_size=micro_batch_size,
                           grad_accum_steps=optim.grad_accum_steps, max_grad_norm=optim.max_grad_norm,
                           bf16=optim.bf16)


class TorchEngine:
    """A torch optimizer stepped by the loop; gradients averaged across ranks before clipping."""

    zero_stage = None
    supports_post_step_hooks = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime = SINGLE, *,
                 max_grad_norm: float | None = None):
        self.module, self.optimizer, self.runtime, self.max_grad_norm = model, optimizer, runtime, max_grad_norm

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor | None:
        """Average gradients over ranks, clip, step; return the gradient norm before clipping (if clipping)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.runtime.world_size > 1 and params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            self.runtime.all_reduce_sum(flat).div_(self.runtime.world_size)
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm) if self.max_grad_norm else None
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def full_parameters(self, *, modify: bool = False):
        yield

    def save_state(self, directory: Path, step: int, tokenizer) -> None:
        """Rank 0 writes weights and optimizer state as safetensors (they are the same on every rank)."""
        if self.runtime.is_main:
            save_training_state(directory, step, self.module, tokenizer, self.optimizer)
        self.runtime.barrier()

    def load_state(self, state: Path) -> int:
        if read_state(state).get("deepspeed"):
            raise _format_changed(state, "under DeepSpeed", "without it")
        return load_training_state(state, self.module, self.optimizer)


class DeepSpeedEngine:
    """The same model and optimizer under `deepspeed.initialize`. DeepSpeed counts micro-steps: `backward`
    then `step` after every micro-batch, and it updates the weights at the accumulation boundary."""

    supports_post_step_hooks = False  # DeepSpeed clears gradients inside its step

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, *,
                 config: dict, micro_batch_size: int, grad_accum_steps: int, max_grad_norm: float | None,
                 bf16: bool):
        import deepspeed

        config = resolve_deepspeed_config(config, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                          world_size=runtime.world_size, max_grad_norm=max_grad_norm, bf16=bf16)
        if runtime.world_size == 1:
            for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
                os.environ.setdefault(name, value)
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if runtime.device().type == "cuda" else "gloo")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine.checkpoint_engine = safetensors_checkpoint_engine()  # DeepSpeed's layout, no pickle
        self.module, self.runtime, self.config = self.engine, runtime, config
        self.zero_stage = self.engine.zero_optimization_stage()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the whole window's targets: no division by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> torch.Tensor | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    def zero_grad(self) -> None:
        pass  # done by DeepSpeed at the boundary

    @contextlib.contextmanager
    def full_parameters(self, *, modify: bool = False):
        """Every parameter whole on every rank inside the block (ZeRO-3 partitions them). With `modify`, what
        rank 0 writes into them is kept (scattered back to the shards) when the block ends."""
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
                yield
        else:
            yield

    def save_state(self, directory: Path, step: int, tokenizer) -> None:
        """Every rank writes its own ZeRO shard (DeepSpeed's checkpoint layout, safetensors inside)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=partial_dir(directory, step).name, save_latest=False)
        self.runtime.barrier()
        if self.runtime.is_main:
            for script in directory.glob("zero_to_*.py"):  # DeepSpeed's converters read torch.save files only
                script.unlink()
            seal(directory, step, deepspeed=True, world_size=self.runtime.world_size, zero_stage=self.zero_stage)
        self.runtime.barrier()

    def load_state(self, state: Path) -> int:
        saved = read_state(state)
        if not saved.get("deepspeed"):
            raise _format_changed(state, "without DeepSpeed", "under it")
        if (saved["world_size"], saved["zero_stage"]) != (self.runtime.world_size, self.zero_stage):
            raise ConfigError(
                f"{state} holds ZeRO-{saved['zero_stage']} shards of {saved['world_size']} rank(s); this run has "
                f"{self.runtime.world_size} rank(s) under ZeRO-{self.zero_stage}. Resume with the same layout, "
                "or delete that directory to start the stage over"
            )
        self.engine.load_checkpoint(str(state.parent), tag=state.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        return int(saved["step"])


def zero_stage_of(config: str | Path | None) -> int | None:
    """The ZeRO stage a DeepSpeed JSON config asks for (0 when it names none); None without DeepSpeed."""
    if config is None:
        return None
    return int(json.loads(Path(config).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0))


def resolve_deepspeed_config(config: dict | str | Path, *, micro_batch_size: int, grad_accum_steps: int,
                             world_size: int, max_grad_norm: float | None, bf16: bool) -> dict:
    """A DeepSpeed config with batch sizes, accumulation, clipping and precision taken from the recipe.

    Values the JSON sets differently are overridden with a warning rather than trusted: the loop's
    normalisation and the reported global batch depend on them.
    """
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    config = json.loads(json.dumps(config))  # a private copy
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
    }
    for key, value in ours.items():
        if key in config and config[key] not in ("auto", value):
            log.warning("DeepSpeed config sets %s=%s; the recipe's %s is used", key, config[key], value)
        config[key] = value
    for key in ("bf16", "fp16"):
        if config.pop(key, {}).get("enabled"):
            log.warning("the DeepSpeed config's %s setting is ignored: precision follows the stage's bf16", key)
    if bf16 and torch.cuda.is_available():
        config["bf16"] = {"enabled": True}
    config.setdefault("steps_per_print", 10**9)  # the loop logs
    return config


def _format_changed(state: Path, saved: str, now: str) -> ConfigError:
    return ConfigError(f"{state} was saved {saved} and this run is {now}; resume it as it was launched, "
                       "or delete that directory to start the stage over")
