"""A stage's resumable state: what a rerun loads to continue from the last save instead of step 0.

Layout, under `<stage dir>/checkpoints/`, one directory per save (older ones pruned):

    step-0000040/trainer_state.json      step, how it was written, and the SHA-256 of every other file
    step-0000040/model.safetensors …     plain torch: an HF checkpoint plus optimizer.safetensors
    step-0000040/*_states.pt             DeepSpeed: its own per-rank files (ZeRO shards of the optimizer)

A save is written whole under `.step-0000040.partial/`, its files flushed to disk, and renamed into place in
one step; only then are older saves dropped. A process killed mid-write leaves a `.partial` directory that no
reader looks at, and the previous save intact. On load every file is checked against the digests recorded in
`trainer_state.json`: a save that was altered or damaged afterwards is skipped (with a warning) for the newest
one that is intact.

With a mirror (`checkpoint_mirror` in the recipe, e.g. `s3://bucket/prefix`), rank 0 copies each complete
save there, and a rerun that finds no local save fetches the mirror's.

DeepSpeed writes its files with `torch.save` and reads them with `torch.load(weights_only=False)`, which
runs arbitrary pickled code. Under adaptflow it writes them through `SafetensorsCheckpointEngine` instead:
DeepSpeed's layout and file names, but each file holds safetensors (tensors) with the nested structure
around them as JSON in the header, and only the few DeepSpeed types listed in `_ALLOWED` can be rebuilt.
Nothing is ever unpickled on resume.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptflow import storage

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def state_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:07d}"


def partial_dir(directory: Path, step: int) -> Path:
    """Where the save of `step` is written before it is renamed to `state_dir`: invisible to readers."""
    return directory / f".step-{step:07d}.partial"


def latest_training_state(directory: Path) -> Path | None:
    """The newest save that is complete and intact (every file matches its recorded digest)."""
    for state in sorted(directory.glob("step-*"), reverse=True):
        if not (state / STATE_FILE).is_file():
            continue
        if (problem := damage(state)) is None:
            return state
        log.warning("ignoring the save %s: %s; resuming from an earlier save if there is one", state, problem)
    return None


def damage(state: Path) -> str | None:
    """What is wrong with a complete save's files, or None when each matches the digest recorded for it."""
    try:
        recorded = read_state(state).get("files")
    except (OSError, ValueError) as err:
        return f"its {STATE_FILE} is unreadable ({err})"
    if recorded is None:
        return None  # written before saves recorded digests
    actual = _file_digests(state)
    wrong = sorted(name for name in recorded.keys() | actual.keys() if recorded.get(name) != actual.get(name))
    return None if not wrong else f"{len(wrong)} file(s) differ from the digests recorded at save time ({', '.join(wrong[:3])})"


def seal(directory: Path, step: int, **extra) -> Path:
    """Make the save written in `partial_dir(step)` the complete `state_dir(step)`: record the step and a digest
    of every file, flush them to disk, rename the directory into place, then drop older and abandoned saves."""
    partial, target = partial_dir(directory, step), state_dir(directory, step)
    digests = _file_digests(partial)
    (partial / STATE_FILE).write_text(json.dumps({"step": step, **extra, "files": digests}))
    for path in partial.rglob("*"):
        if path.is_file():
            _fsync(path)
    if target.exists():  # a save of the same step that failed verification, or from before a resume
        shutil.rmtree(target)
    os.replace(partial, target)
    _fsync(directory)
    for older in [*directory.glob("step-*"), *directory.glob(".step-*.partial")]:
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def read_state(state: Path) -> dict:
    """What a complete save recorded: its step, and how it was written (optimizer state or DeepSpeed layout)."""
    return json.loads((state / STATE_FILE).read_text())


def _file_digests(directory: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_FILE):
        with open(path, "rb") as fh:
            digests[path.relative_to(directory).as_posix()] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mirror_state(state: Path, mirror: str) -> None:
    """Copy a complete save to `mirror` (an `s3://` URI or a path), its marker last; drop older saves there."""
    storage.upload_directory(state, storage.join(mirror, state.name), last=STATE_FILE)
    for name in storage.list_directories(mirror):
        if name.startswith("step-") and name != state.name:
            storage.remove_directory(storage.join(mirror, name))


def fetch_state(directory: Path, mirror: str) -> Path | None:
    """The latest complete save: the local one, else the mirror's, copied into `directory` (a rerun on
    another machine, or after the local disk was lost)."""
    if (local := latest_training_state(directory)) is not None:
        return local
    complete = [name for name in storage.list_directories(mirror)
                if name.startswith("step-") and storage.exists(storage.join(mirror, name, STATE_FILE))]
    if not complete:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    storage.download_directory(storage.join(mirror, complete[-1]), directory / complete[-1])
    return latest_training_state(directory)


def save_training_state(directory: Path, step: int, model, tokenizer, optimizer) -> None:
    """Write `directory/step-<step>`: an HF checkpoint plus the optimizer state, both safetensors."""
    from adaptflow.models.checkpoints import save_checkpoint

    partial = partial_dir(directory, step)
    shutil.rmtree(partial, ignore_errors=True)
    save_checkpoint(model, tokenizer, partial, lineage={"stage": "resume", "step": step})
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, partial / "optimizer.safetensors")
    seal(directory, step, optimizer=meta)


def load_training_state(state: Path, model, optimizer) -> int:
    """Restore weights and optimizer state saved by `save_training_state`; return the step to resume at."""
    from safetensors.torch import load_model

    load_model(model, state / "model.safetensors", strict=False)
    meta = read_state(state)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(state / "optimizer.safetensors"), meta["optimizer"]))
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


# ------------------------------------------------------------------------------------ DeepSpeed's own files

# The only non-builtin types DeepSpeed 0.19 puts in its model and optimizer state (ZeRO 0-3, CPU and GPU).
_ALLOWED = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}
_STRUCTURE = "adaptflow.structure"


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _allowed(name: str) -> type:
    if name not in _ALLOWED:
        raise ValueError(f"checkpoint names type {name!r}, which adaptflow does not rebuild")
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def encode(value, tensors: dict[str, torch.Tensor]):
    """JSON for `value`, its tensors moved into `tensors` (private CPU copies, so no storage is shared)."""
    if torch.is_tensor(value):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if isinstance(value, enum.Enum):
        _allowed(_qualname(type(value)))
        return {"$enum": _qualname(type(value)), "value": value.value}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {"$namedtuple": _qualname(type(value)), "fields": encode(value._asdict(), tensors)}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _qualname(type(value)) in _ALLOWED:
        return {"$object": _qualname(type(value)), "state": encode(vars(value), tensors)}
    raise TypeError(f"cannot store a {_qualname(type(value))} in a safetensors checkpoint")


def decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$size" in value:
        return torch.Size(value["$size"])
    if "$tuple" in value:
        return tuple(decode(v, tensors) for v in value["$tuple"])
    if "$dict" in value:
        return {decode(k, tensors): decode(v, tensors) for k, v in value["$dict"]}
    if "$enum" in value:
        return _allowed(value["$enum"])(value["value"])
    if "$namedtuple" in value:
        return _allowed(value["$namedtuple"])(**decode(value["fields"], tensors))
    if "$object" in value:
        kind = _allowed(value["$object"])
        instance = kind.__new__(kind)
        vars(instance).update(decode(value["state"], tensors))
        return instance
    raise ValueError(f"unknown entry in a checkpoint's structure: {sorted(value)}")


def save_structured(state, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(state, tensors)
    save_file(tensors, str(path), metadata={_STRUCTURE: json.dumps(structure)})


def load_structured(path: str | Path, map_location=None):
    with safe_open(str(path), framework="pt") as f:
        structure = json.loads(f.metadata()[_STRUCTURE])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if map_location is not None and not callable(map_location):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return decode(structure, tensors)


def safetensors_checkpoint_engine():
    """A DeepSpeed checkpoint engine that writes `save_structured` files and never unpickles."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafetensorsCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            save_structured(state_dict, path)

        def load(self, path: str, map_location=None):
            return load_structured(path, map_location)

        def preserves_storage_sharing(self) -> bool:
            return False  # `encode` copies every tensor

    return SafetensorsCheckpointEngine()
