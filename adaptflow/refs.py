"""The small frozen records that cross task boundaries: references, never objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DatasetRef:
    """A prepared dataset split: where it lives, what it holds (content digest) and how many rows."""

    uri: str
    digest: str
    rows: int
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointRef:
    """A Hugging Face–loadable checkpoint directory written by a stage (or the base model)."""

    uri: str
    digest: str
    stage: str
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    metrics: dict[str, float] = field(default_factory=dict)
    passed: bool = True  # every promotion gate passed (true when none is configured)
    gates: tuple[dict, ...] = ()  # each gate's name, value, threshold, verdict and reason

    def to_dict(self) -> dict:
        return asdict(self)
