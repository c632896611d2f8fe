"""The one training loop every objective plugs into, and its resumable state.

Determinism is by construction rather than by saved RNG state: micro-batch `i` is always the same blocks
(a seeded permutation per epoch) with the same mask (a generator seeded by `i`), and dropout is reseeded
every step. Resuming at step k therefore replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adaptflow.config.optimization import Optimization
from adaptflow.errors import ConfigError, DataError, TrainingError
from adaptflow.train.engine import DeepSpeedEngine, TorchEngine
from adaptflow.train.flops import model_shape, peak_flops, training_flops
from adaptflow.train.optim import lr_factor
from adaptflow.train.runtime import SINGLE, Runtime

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
    eval_at_start: bool = True  # a "before" point for the curve; pointless when the head starts random


def loop_settings(optim: Optimization, *, max_steps: int, steps_per_epoch: int, seed: int, evaluates: bool,
                  progress: bool = False, description: str = "train", eval_at_start: bool = False) -> LoopSettings:
    """The loop's settings from a stage's shared `Optimization` section (the one mapping every stage uses).
    `evaluates`: the stage has held-out data; `eval_at_start`: also a "before" point (a curve's first value)."""
    return LoopSettings(
        max_steps=max_steps,
        grad_accum_steps=optim.grad_accum_steps,
        max_grad_norm=optim.max_grad_norm,
        bf16=optim.bf16,
        schedule=optim.schedule,
        warmup_ratio=optim.warmup_ratio,
        log_every=optim.log_every,
        eval_every=optim.eval_interval(steps_per_epoch=steps_per_epoch, max_steps=max_steps) if evaluates else 0,
        save_every=optim.save_every,
        seed=seed,
        progress=progress,
        description=description,
        eval_at_start=eval_at_start and optim.eval_every != 0,
    )


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)  # of the weights the model ends with
    start_metrics: dict[str, float] = field(default_factory=dict)  # of the starting weights (eval_at_start)


class BatchSampler:
    """Micro-batch `i` = a fixed slice of a per-epoch seeded order of the examples (last partial batch dropped).
    (Packed language-modelling blocks have their own streamed sampler: `adaptflow.data.blocks.BlockSampler`.)

    With `lengths`, batches group examples of similar length (sorted within windows of 50 batches, then the
    batches shuffled), so dynamic padding wastes little. With `weights`, each epoch draws examples with
    replacement in proportion to them (e.g. inverse class frequency).
    """

    def __init__(self, items, batch_size: int, seed: int, *, lengths=None, weights: torch.Tensor | None = None):
        if len(items) < batch_size:
            raise DataError(
                f"only {len(items)} training item(s) but batch_size is {batch_size}; "
                "use more data, a smaller block_size or a smaller batch_size"
            )
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.weights = weights
        self.per_epoch = len(items) // batch_size
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        n = len(self.items)
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        if self.lengths is None:
            return order
        window = self.batch_size * 50
        order = torch.cat([c[self.lengths[c].argsort(descending=True)] for c in order.split(window)])
        batches = order[: self.per_epoch * self.batch_size].view(self.per_epoch, self.batch_size)
        return batches[torch.randperm(self.per_epoch, generator=g)].flatten()

    def __call__(self, index: int):
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        picked = self._order[pos * self.batch_size : (pos + 1) * self.batch_size]
        return [self.items[i] for i in picked.tolist()]


class EarlyStopping:
    """Stop when `metric` has not improved for `patience` evaluations; keep a copy of the best weights."""

    def __init__(self, metric: str, *, mode: str = "max", patience: int = 3, restore_best: bool = True):
        self.metric, self.mode, self.patience, self.restore_best = metric, mode, patience, restore_best
        self.best: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_step = 0
        self.bad_evals = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, step: int, metrics: dict[str, float], model: torch.nn.Module) -> bool:
        """Record an evaluation; return True when training should stop."""
        if self.metric not in metrics:
            raise KeyError(f"early_stopping.metric {self.metric!r} is not computed; available: {', '.join(metrics)}")
        value = metrics[self.metric]
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
            self.best_metrics = dict(metrics)
            if self.restore_best:
                self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def restore(self, model: torch.nn.Module) -> bool:
        """Load the best weights back into `model` (if asked to keep them); True if it did."""
        if not (self.restore_best and self._best_state is not None):
            return False
        model.load_state_dict(self._best_state)
        log.info("restored the best weights (step %d, %s = %.4f)", self.best_step, self.metric, self.best)
        return True


def train(
    model: torch.nn.Module,
    objective,
    sampler: BatchSampler,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    device: torch.device,
    start_step: int = 0,
    step_hooks: list[Callable[[int], None]] = (),
    post_step_hooks: list[Callable[[int], None]] = (),
    regularizer: Callable[[], torch.Tensor] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    early_stopping: EarlyStopping | None = None,
    save_state: Callable[[int], None] | None = None,
    log_metrics: MetricsSink | None = None,
    runtime: Runtime = SINGLE,
    engine: TorchEngine | DeepSpeedEngine | None = None,
) -> LoopResult:
    """Run optimizer steps `start_step .. settings.max_steps - 1` (fewer if early stopping halts it).

    Loss is normalised by the number of targets in the whole accumulation window (not per micro-batch),
    so accumulation matches one large batch exactly. A `regularizer` penalty is added once per optimizer
    step and logged apart as `reg_loss`. `step_hooks` run before a step (freezing schedules),
    `post_step_hooks` after the optimizer step and before gradients are cleared (AdaLoRA's budget).
    Host syncs happen only at log and evaluation steps.

    With several ranks (`runtime`), rank r takes micro-batches r, r + W, … and the loss is normalised by the
    targets of the whole window on all ranks, so the update equals one rank's with W times the accumulation.
    `engine` (default: a `TorchEngine` around `optimizer`) applies the gradients; a `DeepSpeedEngine` runs
    the same loop under ZeRO.
    """
    log_metrics = log_metrics or (lambda step, metrics: None)
    engine = engine or TorchEngine(model, optimizer, runtime, max_grad_norm=settings.max_grad_norm)
    if post_step_hooks and not engine.supports_post_step_hooks:
        raise ConfigError("this strategy updates itself from gradients after each optimizer step (AdaLoRA), "
                          "which DeepSpeed clears inside its step; use lora, or run without DeepSpeed")
    if engine.zero_stage == 3 and regularizer is not None:
        raise ConfigError("L2-SP/EWC penalties compare whole weights with their starting values, and ZeRO-3 "
                          "partitions weights across ranks; use ZeRO-2 (infra/deepspeed/zero2.json) for this stage")
    world, rank = runtime.world_size, runtime.rank
    forward = engine.module  # the model itself, or DeepSpeed's engine around it
    for group in engine.param_groups:
        group.setdefault("initial_lr", group["lr"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    model.train()
    eval_metrics: dict[str, float] = {}
    if evaluate is not None and settings.eval_every and settings.eval_at_start and start_step == 0:
        eval_metrics = evaluate()
        log_metrics(0, eval_metrics)
        model.train()
    start_metrics = dict(eval_metrics)

    window_loss = torch.zeros((), device=device)
    window_reg = torch.zeros((), device=device)
    window_targets = window_tokens = window_steps = 0
    window_flops = 0.0
    shape = model_shape(model)
    peak = peak_flops(device, bf16=settings.bf16)
    done = start_step
    window_start = started = time.perf_counter()
    tokens_total = 0
    last: dict[str, float] = {}
    grad_norm = None
    with _progress(settings, start_step) as advance:
        for step in range(start_step, settings.max_steps):
            for hook in step_hooks:
                hook(step)
            for group in engine.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(
                    settings.schedule, step, settings.max_steps, settings.warmup_ratio, group.get("start_step", 0)
                )
            torch.manual_seed(settings.seed * 1_000_003 + step)  # dropout: a pure function of the step

            first = step * settings.grad_accum_steps
            batches = []
            for i in range(first, first + settings.grad_accum_steps):
                index = i * world + rank  # the micro-batch's place in the one sequence all ranks share
                g = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
                batches.append(objective.collate(sampler(index), g))
            targets = sum(b["n_targets"] for b in batches)
            if world > 1:
                targets = int(runtime.all_reduce_sum(torch.tensor(targets, dtype=torch.int64)))
            targets = max(1, targets)
            for n, batch in enumerate(batches):
                mask = batch.get("attention_mask")
                tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                window_tokens += tokens
                window_flops += training_flops(shape, tokens, batch["input_ids"].shape[-1])
                batch = to_device(batch, device)
                with autocast:
                    loss_sum = objective.loss(forward, batch)
                window_loss += loss_sum.detach()
                # × world: the engine averages gradients over ranks, the sum over the window is wanted.
                loss = loss_sum * (world / targets)
                if regularizer is not None and n == len(batches) - 1:
                    penalty = regularizer()
                    loss = loss + penalty
                    window_reg += penalty.detach()
                engine.backward(loss)
            window_targets += targets

            grad_norm = engine.step()
            for hook in post_step_hooks:
                hook(step)
            engine.zero_grad()
            done = step + 1
            window_steps += 1

            if done % settings.log_every == 0 or done == settings.max_steps:
                if world > 1:  # window_targets is already global
                    window_loss = runtime.all_reduce_sum(window_loss)
                    counts = runtime.all_reduce_sum(torch.tensor([window_tokens, window_flops], dtype=torch.float64))
                    window_tokens, window_flops = int(counts[0]), float(counts[1])  # tokens < 2**53: exact
                loss = window_loss.item() / window_targets
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} between steps {done - settings.log_every + 1} and {done}; "
                        "lower the learning rate, enable gradient clipping, or check the data"
                    )
                elapsed = time.perf_counter() - window_start
                last = {
                    "loss": loss,
                    "lr": engine.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / elapsed,
                    "model_tflops": window_flops / elapsed / 1e12,  # estimated, over all ranks
                }
                if peak is not None:
                    last["mfu"] = window_flops / elapsed / (peak * world)
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                if regularizer is not None:
                    last["reg_loss"] = window_reg.item() / window_steps
                    window_reg.zero_()
                log_metrics(done, last)
                advance(done, last)
                tokens_total += window_tokens
                window_loss.zero_()
                window_targets = window_tokens = window_steps = 0
                window_flops = 0.0
                window_start = time.perf_counter()
            if save_state is not None and settings.save_every and done % settings.save_every == 0:
                save_state(done)
            if evaluate is not None and settings.eval_every and (
                done % settings.eval_every == 0 or done == settings.max_steps
            ):
                eval_metrics = evaluate()
                log_metrics(done, eval_metrics)
                model.train()
                if early_stopping is not None:
                    with engine.full_parameters():  # the best weights are kept whole, even under ZeRO-3
                        stop = early_stopping.update(done, eval_metrics, model)
                    if stop:
                        log.info("early stopping at step %d: no %s improvement in %d evaluations",
                                 done, early_stopping.metric, early_stopping.patience)
                        break
    if early_stopping is not None:
        with engine.full_parameters(modify=True):
            restored = early_stopping.restore(model)
        if restored:
            eval_metrics = early_stopping.best_metrics
    return LoopResult(
        steps=done - start_step,
        tokens=tokens_total,
        seconds=time.perf_counter() - started,
        last_metrics=last,
        eval_metrics=eval_metrics,
        start_metrics=start_metrics,
    )


class _progress:
    """A rich progress bar (step, loss, tokens/s, ETA) when asked for; a log line per log step otherwise."""

    def __init__(self, settings: LoopSettings, start: int):
        self.settings, self.start, self.bar = settings, start, None

    def __enter__(self):
        if not self.settings.progress:
            def log_line(step: int, metrics: dict[str, float]) -> None:
                mfu = f" MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                log.info("%s step %d/%d loss %.4f %.0f tokens/s%s", self.settings.description, step,
                         self.settings.max_steps, metrics["loss"], metrics["tokens_per_s"], mfu)

            return log_line
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[mfu]}"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        task = self.bar.add_task(
            self.settings.description, total=self.settings.max_steps, completed=self.start, loss="-", tps="-",
            mfu="",
        )

        def advance(step: int, metrics: dict[str, float]) -> None:
            self.bar.update(
                task, completed=step, loss=f"{metrics['loss']:.3f}", tps=f"{metrics['tokens_per_s']:,.0f}",
                mfu=f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "",
            )

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def to_device(batch: dict, device) -> dict:
    """`batch` with its tensors on `device`, nested batches (e.g. adaptation's target text) included."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict)
            else v for k, v in batch.items()}
