"""Checks of a valid recipe against the world (files exist, the model is a checkpoint), before any compute."""

from __future__ import annotations

import json
from pathlib import Path

from adaptflow.config import Recipe
from adaptflow.errors import DataError
from adaptflow.storage import exists


def preflight_problems(recipe: Recipe) -> list[str]:
    """Every problem found with the recipe's inputs; empty when the build can start."""
    problems = []
    for name in recipe.used_corpora():
        uri = recipe.corpora[name].path
        try:
            if not exists(uri):
                problems.append(
                    f"corpora.{name}.path: not found: {uri} (relative paths resolve against the data root: "
                    "the recipe's data_root, else $ADAPTFLOW_DATA_ROOT, else ../shared/data)"
                )
        except DataError as err:
            problems.append(f"corpora.{name}.path: {err}")
    for name in recipe.used_tasks():
        task = recipe.tasks[name]
        for split in ("train", "validation", "test"):
            paths = getattr(task, split)
            for uri in [paths] if isinstance(paths, str) else paths or []:
                try:
                    if not exists(uri):
                        problems.append(f"tasks.{name}.{split}: not found: {uri}")
                except DataError as err:
                    problems.append(f"tasks.{name}.{split}: {err}")
    if recipe.model.path is not None:
        path = Path(recipe.model.path)
        if not path.is_dir():
            problems.append(f"model.path: no such directory: {path}")
        elif not (path / "config.json").is_file():
            problems.append(f"model.path: {path} has no config.json; it must be a save_pretrained directory")
        elif not any(path.glob("*.safetensors")):
            problems.append(f"model.path: {path} holds no *.safetensors weights (.bin files are never unpickled)")
    distributed = recipe.distributed
    if distributed.hostfile is not None and not Path(distributed.hostfile).is_file():
        problems.append(f"distributed.hostfile: not found: {distributed.hostfile}")
    if distributed.deepspeed is not None:
        try:
            json.loads(Path(distributed.deepspeed).read_text(encoding="utf-8"))
        except OSError:
            problems.append(f"distributed.deepspeed: not found: {distributed.deepspeed} "
                            "(infra/deepspeed/ has zero2.json, zero3.json and zero3-offload.json)")
        except ValueError as err:
            problems.append(f"distributed.deepspeed: {distributed.deepspeed} is not JSON: {err}")
    return problems
