"""The building blocks of every recipe section: a strict frozen base model, value types, and the marker that says
a setting names one of the recipe's corpora or tasks (the recipe checks every such name against what it declares).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Probability = Annotated[float, Field(gt=0, lt=1)]
# Corpus and task names become directory and S3 key components: plain names only, never a path.
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)]


class Section(BaseModel):
    """A recipe section: unknown keys are errors (with a did-you-mean), values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Reference:
    """Marks a setting that names an entry of the recipe's `corpora:` or `tasks:`.

    `kind`: the task kind the stage works on; `fine_tuned`: the name must be the task `stages.finetune` trains on
    (the text says why); `like_fine_tuned`: a task of the same kind as that one; `special`: values that name no
    entry (e.g. `task` for "the task's own text").
    """

    section: str  # "corpora" or "tasks"
    kind: str | None = None
    fine_tuned: str | None = None
    like_fine_tuned: bool = False
    special: tuple[str, ...] = ()


CorpusName = Annotated[str, Reference("corpora")]
TaskName = Annotated[str, Reference("tasks")]


def one_of(value: str, names) -> str:
    """`value` if it is one of `names` (a registry's keys), else the error pydantic gives for a `Literal`."""
    if value not in names:
        quoted = [repr(n) for n in names]
        choices = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise ValueError(f"Input should be {choices}")
    return value
