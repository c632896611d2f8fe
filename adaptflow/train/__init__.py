"""Training: the one loop every objective plugs into (`loop`), the engine under it — plain torch or DeepSpeed
(`engine`) — on this process's ranks (`runtime`), the optimizer and schedule (`optim`), resumable saves
(`checkpointing`) and FLOP accounting (`flops`)."""

from adaptflow.train.engine import DeepSpeedEngine, TorchEngine, make_engine
from adaptflow.train.loop import (
    BatchSampler,
    EarlyStopping,
    LoopResult,
    LoopSettings,
    MetricsSink,
    loop_settings,
    train,
)
from adaptflow.train.optim import adamw, param_groups
from adaptflow.train.runtime import SINGLE, Runtime

__all__ = [
    "SINGLE", "BatchSampler", "DeepSpeedEngine", "EarlyStopping", "LoopResult", "LoopSettings", "MetricsSink",
    "Runtime", "TorchEngine", "adamw", "loop_settings", "make_engine", "param_groups", "train",
]
