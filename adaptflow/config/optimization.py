"""The settings every training stage shares — optimiser, schedule, precision and cadence — read by the one loop.

Each training stage's `Config` derives from `Optimization` (with its own defaults), so `lr`, `schedule` or
`eval_every` mean the same in `stages.pretrain`, `stages.adapt` and `stages.finetune`, and one function maps
them to the loop (`adaptflow.train.loop_settings`).

`eval_every`, in every stage: evaluate on held-out data every N optimizer steps and after the last one;
`epoch`: after every epoch of the training data and after the last step; `0`: only after the last step.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from adaptflow.config.base import NonNegativeInt, PositiveFloat, PositiveInt, Section

EvalEvery = NonNegativeInt | Literal["epoch"]


class Optimization(Section):
    resumable: ClassVar[bool] = True  # the stage continues from its last save (`save_every`) when rerun

    lr: PositiveFloat = 5e-5
    head_lr: PositiveFloat | None = None  # newly initialised weights (a task or LM head); default: lr
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # the learning-rate schedule after warmup
    max_grad_norm: PositiveFloat | None = 1.0
    grad_accum_steps: PositiveInt = 1
    bf16: bool = False
    log_every: PositiveInt = 10
    eval_every: EvalEvery = 0
    save_every: NonNegativeInt = 0  # resumable saves every N steps (0: none); a rerun continues from the last

    @model_validator(mode="after")
    def _saves_are_resumed(self) -> Optimization:
        if self.save_every and not self.resumable:
            raise ValueError(f"save_every ({self.save_every}): this stage does not resume from saves yet (continued "
                             "pretraining does); leave it at 0")
        return self

    def eval_interval(self, *, steps_per_epoch: int, max_steps: int) -> int:
        """`eval_every` in optimizer steps (the loop also evaluates after the last step)."""
        if self.eval_every == "epoch":
            return max(1, steps_per_epoch)
        return self.eval_every or max_steps
