"""The small frozen records that cross task and process boundaries: references, never objects.

Every record is a frozen dataclass deriving from `Record`, which gives it one JSON form: `to_dict()` and
`from_dict()` rebuild nested records, tuples and pydantic settings from the type hints. A stage's `Inputs` and
`Result`, a launched stage's spec and result file, and a reused stage's stored result all use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Self


class Record:
    """Mixin for frozen dataclasses that travel as JSON (`to_dict` / `from_dict`, nested records included)."""

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{cls.__qualname__}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{name: _build(hints[name], value) for name, value in data.items()})

    def references(self) -> list[tuple[str, Any]]:
        """Every `CheckpointRef` and `DatasetRef` inside, with its path (`source/train`), in field order. A field's
        `metadata={"context": ...}` renames its part of the path ("" drops it: a task's splits as `train`, …)."""
        return list(_walk(self, ""))


@dataclass(frozen=True)
class DatasetRef(Record):
    """A prepared dataset split: where it lives, what it holds (content digest) and how many rows."""

    uri: str
    digest: str
    rows: int
    name: str = ""


@dataclass(frozen=True)
class CheckpointRef(Record):
    """A Hugging Face–loadable checkpoint directory written by a stage (or the base model)."""

    uri: str
    digest: str
    stage: str
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class EvalReport(Record):
    metrics: dict[str, float] = field(default_factory=dict)
    passed: bool = True  # every promotion gate passed (true when none is configured)
    gates: tuple[dict, ...] = ()  # each gate's name, value, threshold, verdict and reason
    notes: dict[str, str] = field(default_factory=dict)  # why something was not measured

    @property
    def verdict(self) -> str:
        return "none" if not self.gates else "passed" if self.passed else "failed"


def _plain(value):
    """JSON-ready copy: records and dataclasses as dicts, tuples as lists, pydantic settings as their JSON dump."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if hasattr(value, "__fspath__") else value


def _build(hint, value):
    """`value` (from JSON) as an instance of the type `hint`."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(_build(item, v) for v in value)
    if origin is list:
        return [_build(args[0] if args else Any, v) for v in value]
    if origin is dict:
        return {k: _build(args[1] if args else Any, v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    if isinstance(hint, type) and hasattr(hint, "model_validate"):
        return hint.model_validate(value)
    return value


def _walk(value, path: str):
    if isinstance(value, (CheckpointRef, DatasetRef)):
        yield path, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name), _join(path, f.metadata.get("context", f.name)))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, _join(path, str(key)))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(item, _join(path, str(i)))


def _join(path: str, part: str) -> str:
    return f"{path}/{part}" if path and part else path or part
