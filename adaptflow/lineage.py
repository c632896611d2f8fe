"""Stage cache keys and the lineage record written beside every checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from adaptflow import __version__
from adaptflow.models.checkpoints import read_lineage
from adaptflow.refs import CheckpointRef, DatasetRef, Record


def stage_cache_key(stage: str, config: dict, inputs: Record, seed: int) -> str:
    """hash(stage, its settings, its inputs' content, seed, engine version): equal keys, equal outputs.

    Inputs count by content: a checkpoint or dataset by its digest (not where it lies), anything else by value."""
    payload = {"stage": stage, "config": config, "inputs": fingerprint(inputs), "seed": seed, "engine": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(value):
    """`value` with every checkpoint and dataset reference replaced by its content digest."""
    if isinstance(value, (CheckpointRef, DatasetRef)):
        return value.digest
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: fingerprint(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    return value


def stage_lineage(stage: str, *, config: dict, cache_key: str, inputs: Record, mlflow_run_id: str | None,
                  build_run_id: str | None = None) -> dict:
    """Everything needed to say where a checkpoint came from: config, inputs, datasets, runs, upstream chain.
    The input checkpoint is the first one `inputs` holds (the model the stage started from)."""
    references = inputs.references()
    input_checkpoint = next(ref for _, ref in references if isinstance(ref, CheckpointRef))
    datasets = [ref for _, ref in references if isinstance(ref, DatasetRef)]
    upstream = read_lineage(input_checkpoint.uri)
    chain = [*upstream.get("chain", []), {"stage": input_checkpoint.stage, "uri": input_checkpoint.uri,
                                          "digest": input_checkpoint.digest,
                                          "mlflow_run_id": input_checkpoint.mlflow_run_id}]
    return {
        "stage": stage,
        "engine_version": __version__,
        "git_commit": git_commit(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cache_key": cache_key,
        "mlflow_run_id": mlflow_run_id,
        "build_run_id": build_run_id,
        "input_checkpoint": input_checkpoint.to_dict(),
        "datasets": [d.to_dict() for d in datasets],
        "chain": chain,
        "config": config,
    }


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The git commit of the engine's source tree (or of `cwd`), when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
