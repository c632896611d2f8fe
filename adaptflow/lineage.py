"""Stage cache keys and the lineage record written beside every checkpoint."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from adaptflow import __version__
from adaptflow.models import read_lineage
from adaptflow.refs import CheckpointRef, DatasetRef


def stage_cache_key(stage: str, config: dict, input_checkpoint: str, datasets: list[DatasetRef]) -> str:
    """hash(stage config, input checkpoint digest, dataset digests, engine version): equal keys, equal outputs."""
    payload = {
        "stage": stage,
        "config": config,
        "input": input_checkpoint,
        "datasets": sorted(d.digest for d in datasets),
        "engine": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_lineage(
    stage: str,
    *,
    config: dict,
    cache_key: str,
    input_checkpoint: CheckpointRef,
    datasets: list[DatasetRef],
    mlflow_run_id: str | None,
    build_run_id: str | None = None,
) -> dict:
    """Everything needed to say where a checkpoint came from: config, inputs, datasets, runs, upstream chain."""
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
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
