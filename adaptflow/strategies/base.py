"""What every strategy returns (the prepared model and the hooks the loop calls) and what it may read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from adaptflow.models.layers import is_head


@dataclass
class Strategy:
    """A model prepared for one strategy, with the hooks the training loop must call."""

    model: nn.Module
    step_hooks: list[Callable[[int], None]] = field(default_factory=list)
    post_step_hooks: list[Callable[[int], None]] = field(default_factory=list)
    is_peft: bool = False


@dataclass(frozen=True)
class StrategySettings:
    """The recipe's strategy options and the model's situation.

    `new_parameters` names the weights the starting checkpoint did not have (a task head, and e.g. BERT's pooler
    after masked-LM pretraining): they start random, so every strategy trains them — and PEFT saves them with the
    adapter, or the adapter alone could not reproduce the model. `section` names the recipe section in errors.
    """

    kind: object  # the task kind (adaptflow.kinds.TaskKind)
    section: str = "stages.finetune"
    peft: dict = field(default_factory=dict)
    adapter_reduction: int = 16
    unfreeze_every: int = 50
    total_steps: int = 1
    new_parameters: frozenset[str] = frozenset()

    def is_new(self, name: str) -> bool:
        return is_head(name) or name in self.new_parameters


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(1, total)


def freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
