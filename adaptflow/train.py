"""The one training loop every objective plugs into, and its resumable state.

Determinism is by construction rather than by saved RNG state: micro-batch `i` is always the same blocks
(a seeded permutation per epoch) with the same mask (a generator seeded by `i`), and dropout is reseeded
every step. Resuming at step k therefore replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaptflow.errors import DataError, TrainingError

log = logging.getLogger(__name__)

MetricsSink = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    progress: bool = False
    description: str = "train"


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)


class BlockSampler:
    """Micro-batch `i` = a fixed slice of a per-epoch seeded permutation of the blocks (last partial batch dropped)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if len(blocks) < batch_size:
            raise DataError(
                f"only {len(blocks)} training block(s) but batch_size is {batch_size}; "
                "use more data, a smaller block_size or a smaller batch_size"
            )
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(blocks) // batch_size
        self._epoch, self._order = -1, None

    def __call__(self, index: int) -> torch.Tensor:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.blocks), generator=g)
        return self.blocks[self._order[pos * self.batch_size : (pos + 1) * self.batch_size]]


def lr_factor(schedule: str, step: int, total: int, warmup_ratio: float, start: int = 0) -> float:
    """Multiplier of a group's initial lr at `step`: 0 before `start`, then linear warmup, then decay."""
    if step < start:
        return 0.0
    span = max(1, total - start)
    warmup = int(warmup_ratio * span)
    t = step - start
    if t < warmup:
        return (t + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (t - warmup) / max(1, span - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1 - progress)


def train(
    model: torch.nn.Module,
    objective,
    sampler: BlockSampler,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    device: torch.device,
    start_step: int = 0,
    step_hooks: list[Callable[[int], None]] = (),
    evaluate: Callable[[], dict[str, float]] | None = None,
    save_state: Callable[[int], None] | None = None,
    log_metrics: MetricsSink | None = None,
) -> LoopResult:
    """Run optimizer steps `start_step .. settings.max_steps - 1`.

    Loss is normalised by the number of target tokens in the whole accumulation window (not per
    micro-batch), so accumulation matches one large batch exactly. Host syncs happen only at log steps.
    """
    log_metrics = log_metrics or (lambda step, metrics: None)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    model.train()
    if evaluate is not None and settings.eval_every and start_step == 0:
        log_metrics(0, evaluate())
        model.train()

    window_loss = torch.zeros((), device=device)
    window_targets = window_tokens = 0
    window_start = started = time.perf_counter()
    tokens_total = 0
    last: dict[str, float] = {}
    grad_norm = None
    with _progress(settings, start_step) as advance:
        for step in range(start_step, settings.max_steps):
            for hook in step_hooks:
                hook(step)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(
                    settings.schedule, step, settings.max_steps, settings.warmup_ratio, group.get("start_step", 0)
                )
            torch.manual_seed(settings.seed * 1_000_003 + step)  # dropout: a pure function of the step

            first = step * settings.grad_accum_steps
            batches = []
            for i in range(first, first + settings.grad_accum_steps):
                g = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)
                batches.append(objective.collate(sampler(i), g))
            targets = max(1, sum(b["n_targets"] for b in batches))
            for batch in batches:
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with autocast:
                    loss_sum = objective.loss(model, batch)
                (loss_sum / targets).backward()
                window_loss += loss_sum.detach()
                window_tokens += batch["input_ids"].numel()
            window_targets += targets

            if settings.max_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], settings.max_grad_norm
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            if done % settings.log_every == 0 or done == settings.max_steps:
                loss = window_loss.item() / window_targets
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} between steps {done - settings.log_every + 1} and {done}; "
                        "lower the learning rate, enable gradient clipping, or check the data"
                    )
                elapsed = time.perf_counter() - window_start
                last = {
                    "loss": loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / elapsed,
                }
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                log_metrics(done, last)
                advance(done, last)
                tokens_total += window_tokens
                window_loss.zero_()
                window_targets = window_tokens = 0
                window_start = time.perf_counter()
            if evaluate is not None and settings.eval_every and (
                done % settings.eval_every == 0 or done == settings.max_steps
            ):
                log_metrics(done, evaluate())
                model.train()
            if save_state is not None and settings.save_every and done % settings.save_every == 0:
                save_state(done)
    return LoopResult(
        steps=settings.max_steps - start_step,
        tokens=tokens_total,
        seconds=time.perf_counter() - started,
        last_metrics=last,
    )


class _progress:
    """A rich progress bar (step, loss, tokens/s, ETA) when asked for; a log line per log step otherwise."""

    def __init__(self, settings: LoopSettings, start: int):
        self.settings, self.start, self.bar = settings, start, None

    def __enter__(self):
        if not self.settings.progress:
            def log_line(step: int, metrics: dict[str, float]) -> None:
                log.info("%s step %d/%d loss %.4f %.0f tokens/s", self.settings.description, step,
                         self.settings.max_steps, metrics["loss"], metrics["tokens_per_s"])

            return log_line
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        task = self.bar.add_task(
            self.settings.description, total=self.settings.max_steps, completed=self.start, loss="-", tps="-"
        )

        def advance(step: int, metrics: dict[str, float]) -> None:
            self.bar.update(
                task, completed=step, loss=f"{metrics['loss']:.3f}", tps=f"{metrics['tokens_per_s']:,.0f}"
            )

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def save_training_state(directory: Path, step: int, model, tokenizer, optimizer) -> None:
    """Write `directory/step-<step>` atomically: an HF checkpoint plus optimizer state. Older states are pruned."""
    from adaptflow.models import save_checkpoint

    target = directory / f"step-{step:07d}"
    save_checkpoint(model, tokenizer, target, lineage={"stage": "resume", "step": step})
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, target / "optimizer.safetensors")
    (target / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer": meta}))
    for older in directory.glob("step-*"):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)


def latest_training_state(directory: Path) -> Path | None:
    complete = [d for d in sorted(directory.glob("step-*")) if (d / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def load_training_state(state_dir: Path, model, optimizer) -> int:
    """Restore weights and optimizer state saved by `save_training_state`; return the step to resume at."""
    from safetensors.torch import load_model

    load_model(model, state_dir / "model.safetensors", strict=False)
    meta = json.loads((state_dir / "trainer_state.json").read_text())
    tensors = load_file(state_dir / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    return int(meta["step"])


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def pick_device() -> torch.device:
    if torch.cuda.is_available() and os.environ.get("ADAPTFLOW_DEVICE", "") != "cpu":
        return torch.device("cuda")
    return torch.device("cpu")
