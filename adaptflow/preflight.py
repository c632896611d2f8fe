"""Checks of a valid recipe against the world (files exist, the model is a checkpoint), before any compute."""

from __future__ import annotations

import json
import os
from pathlib import Path

from adaptflow.errors import DataError
from adaptflow.models.builders import pickle_refusal, pickle_weights
from adaptflow.models.checkpoints import infer_objective
from adaptflow.recipe import Recipe
from adaptflow.storage import exists, is_s3, open_input


def preflight_problems(recipe: Recipe, tracking_uri: str | None = None) -> list[str]:
    """Every problem found with the recipe's inputs and its tracking server; empty when the build can start.
    `tracking_uri` is the one the build will use when given on the command line."""
    problems = []
    if problem := _tracking_problem(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe.tracking.uri):
        problems.append(problem)
    for name in recipe.used_corpora():
        if problem := _missing(recipe.corpora[name].path, "corpus file"):
            problems.append(f"corpora.{name}.path: {problem}")
    for name in recipe.used_tasks():
        task = recipe.tasks[name]
        for split in ("train", "validation", "test"):
            paths = getattr(task, split)
            for uri in [paths] if isinstance(paths, str) else paths or []:
                if problem := _missing(uri, f"{split} file"):
                    problems.append(f"tasks.{name}.{split}: {problem}")
    if recipe.model.path is not None:
        path = Path(recipe.model.path)
        if not path.is_dir():
            problems.append(f"model.path: no such directory: {path}")
        elif not (path / "config.json").is_file():
            problems.append(f"model.path: {path} has no config.json; it must be a save_pretrained directory")
        elif not any(path.glob("*.safetensors")):
            if not pickle_weights(path):
                problems.append(f"model.path: {path} holds no weights (no *.safetensors file)")
            elif not recipe.model.allow_pickle_weights:
                problems.append(f"model.path: {pickle_refusal(path)}")
        elif problem := _vocabulary_problem(path, recipe.model.trust_remote_code):
            problems.append(f"model.path: {problem}")
        if recipe.enabled("self_instruct") is not None and (path / "config.json").is_file() and \
                infer_objective(str(path)) != "clm":
            problems.append(f"stages.self_instruct: model.path {path} is an encoder; generating instructions needs "
                            "a decoder (causal LM)")
        adapting = recipe.enabled("adapt")
        if adapting is not None and adapting.target_mlm is not None and (path / "config.json").is_file() and \
                infer_objective(str(path)) != "mlm":
            problems.append(f"stages.adapt.target_mlm: model.path {path} is a decoder; a masked LM on target text "
                            "needs an encoder (or set stages.adapt.target_mlm: null)")
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


def _tracking_problem(uri: str | None) -> str | None:
    """An MLflow server that does not answer its health check within a few seconds (instead of MLflow's own
    minutes of retries deep inside the first stage)."""
    import urllib.request

    from adaptflow.tracking.runs import redact

    if not uri or not uri.startswith(("http://", "https://")):
        return None  # the default SQLite store, a file store or a managed service
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            if response.status == 200:
                return None
            reason = f"HTTP {response.status}"
    except OSError as err:
        reason = str(getattr(err, "reason", err))
    return (f"tracking URI {redact(uri)}: the MLflow server does not answer ({reason}); start it, or fix "
            "--tracking-uri / MLFLOW_TRACKING_URI / tracking.uri")


def _missing(uri: str, what: str) -> str | None:
    """Why `uri` cannot be read (a missing file, key or bucket; an unreachable endpoint), or None."""
    try:
        if exists(uri):
            return None
        if is_s3(uri):
            open_input(uri, what=what).close()  # raises the precise reason: no such bucket, or no such key
    except DataError as err:
        return str(err)
    return (f"not found: {uri} (relative paths resolve against the data root: the recipe's data_root, else "
            "$ADAPTFLOW_DATA_ROOT, else ../shared/data)")


def _vocabulary_problem(path: Path, trust_remote_code: bool) -> str | None:
    """A tokenizer with more tokens than the model's embedding rows (ids past the table crash mid-training)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        return f"{path}: cannot load its config or tokenizer ({err})"
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        return (f"the tokenizer of {path} has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
                "the tokenizer and weights don't match (save both from one model)")
    return None
