"""The MLflow model registry: every finished build registers its model as a new version with alias `challenger`.

    register_build(client, run_id=..., checkpoint=..., kind=..., model_name=..., gates=...) -> version

The version is the MLflow transformers flavour (a pipeline: loadable with `mlflow.pyfunc.load_model` and
`mlflow.transformers.load_model`; its `model/` and `components/tokenizer/` folders load with plain
transformers) with explicit `pip_requirements`. Its tags say where it came from: the build run, every stage of
the chain with its checkpoint digest, every dataset digest, and each promotion gate's verdict.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from adaptflow.models import read_lineage
from adaptflow.refs import CheckpointRef

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
PIPELINE_TASKS = {"classification": "text-classification", "ner": "token-classification", "sft": "text-generation",
                  "mlm": "fill-mask", "clm": "text-generation"}


def pip_requirements() -> list[str]:
    """What a registered model needs to load: the exact libraries it was built with (never torchvision)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "transformers", "tokenizers",
                                                                  "safetensors")]


def version_tags(checkpoint: CheckpointRef, *, build_run_id: str, gates: list[dict], passed: bool) -> dict[str, str]:
    """Provenance of a registered version: build run, stage chain, dataset digests, gate verdicts."""
    lineage = read_lineage(checkpoint.uri)
    chain = [*lineage.get("chain", []), {"stage": checkpoint.stage, "digest": checkpoint.digest,
                                         "mlflow_run_id": checkpoint.mlflow_run_id}]
    tags = {
        "adaptflow.build_run_id": build_run_id,
        "adaptflow.checkpoint.digest": checkpoint.digest,
        "adaptflow.stage_chain": " → ".join(f"{link['stage']}:{link['digest']}" for link in chain),
        "adaptflow.datasets": json.dumps({d["name"]: d["digest"] for d in lineage.get("datasets", [])}),
        "adaptflow.gates": "none" if not gates else "passed" if passed else "failed",
    }
    for gate in gates:
        tags[f"adaptflow.gate.{gate['name']}"] = f"{'pass' if gate['passed'] else 'FAIL'}: {gate['reason']}"
    return tags


def register_build(client, *, run_id: str, checkpoint: CheckpointRef, kind: str, model_name: str,
                   tags: dict[str, str]) -> str:
    """Log `checkpoint` as the build run's `model` artifact, register it under `model_name`, point `challenger`
    at the new version; return the version."""
    import mlflow.transformers
    import transformers
    from mlflow.exceptions import MlflowException

    from adaptflow.models import TASK_AUTO_CLASSES, quiet_transformers

    task = PIPELINE_TASKS[kind]
    with quiet_transformers():
        if kind in TASK_AUTO_CLASSES:
            model = getattr(transformers, TASK_AUTO_CLASSES[kind]).from_pretrained(checkpoint.uri)
        else:
            auto = transformers.AutoModelForMaskedLM if kind == "mlm" else transformers.AutoModelForCausalLM
            model = auto.from_pretrained(checkpoint.uri)
        pipeline = transformers.pipeline(task, model=model, tokenizer=transformers.AutoTokenizer.from_pretrained(
            checkpoint.uri))
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.transformers.save_model(pipeline, Path(tmp) / "model", pip_requirements=pip_requirements())
        client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
    try:
        client.create_registered_model(model_name, description="adaptflow builds; alias champion = in service")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(model_name, source, run_id=run_id, tags=tags).version
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    log.info("registered %s version %s (%s) as %s", model_name, version, task, CHALLENGER)
    return str(version)
