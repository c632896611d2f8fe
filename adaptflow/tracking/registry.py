"""The MLflow model registry: every finished build registers its model as a new version with alias `challenger`;
`promote` moves `champion` to it only when its gates passed (never on a verdict of "none": no gate judged it), or
when forced, with a reason; `rollback` moves `champion` back. Every decision is an audit run in the `adaptflow-registry-audit` experiment; nothing is deleted.

    register_build(client, run_id=..., checkpoint=..., kind=..., model_name=..., tags=...) -> version
    promote(client, model_name, version=None, force=False, reason=None) / rollback(client, model_name)

The version is the MLflow transformers flavour (a pipeline: loadable with `mlflow.pyfunc.load_model` and
`mlflow.transformers.load_model`; its `model/` and `components/tokenizer/` folders load with plain
transformers) with explicit `pip_requirements`. Its tags say where it came from: the build run, every stage of
the chain with its checkpoint digest, every dataset digest, and each promotion gate's verdict.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from adaptflow import kinds
from adaptflow.errors import AdaptflowError, ConfigError
from adaptflow.models.checkpoints import quiet_transformers, read_lineage
from adaptflow.refs import CheckpointRef
from adaptflow.tracking.runs import ensure_experiment, sqlite_store_lock

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
LM_PIPELINES = {"mlm": ("fill-mask", "AutoModelForMaskedLM"), "clm": ("text-generation", "AutoModelForCausalLM")}


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
    at the new version; return the version. `kind` is a task kind, or `mlm` / `clm` for a language model."""
    import mlflow.transformers
    import transformers
    from mlflow.exceptions import MlflowException

    if kind in LM_PIPELINES:
        task, auto = LM_PIPELINES[kind]
    else:
        task, auto = kinds.get(kind).pipeline_task, kinds.get(kind).auto_model
    with quiet_transformers():
        model = getattr(transformers, auto).from_pretrained(checkpoint.uri)
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
    version = str(client.create_model_version(model_name, source, run_id=run_id, tags=tags).version)
    # Versions are numbered in registration order; of two builds finishing together the later one is the
    # challenger, whichever sets the alias last.
    while True:
        current = _alias_version(client, model_name, CHALLENGER)
        if current is not None and int(current) > int(version):
            log.warning("registered %s version %s; %s stays on the newer version %s (another build registered it "
                        "meanwhile)", model_name, version, CHALLENGER, current)
            return version
        if _set_alias(client, model_name, CHALLENGER, version):
            break
    log.info("registered %s version %s (%s) as %s", model_name, version, task, CHALLENGER)
    return version


# ------------------------------------------------------------------------------------ promotion

AUDIT_EXPERIMENT = "adaptflow-registry-audit"


class PromotionRefused(AdaptflowError, RuntimeError):
    """The champion alias was not moved (gates failed, nothing to roll back to, …); the reason is recorded."""


ANY = "any"  # `promote(expected_champion=ANY)`: the decision does not depend on which version is champion


def promote(client, model_name: str, *, version: str | None = None, force: bool = False, reason: str | None = None,
            user: str | None = None, expected_champion: str | None = ANY) -> dict:
    """Point `champion` at `version` (default: the `challenger`) when its gates passed, or when `force`d with a
    `reason`. Every decision, refusals included, is an audit run; nothing is deleted. Returns the record.

    `expected_champion` is the champion the decision was based on (the version a build's evaluation compared
    against, None for "there was none"): if another build or person moved the alias since, the decision is stale
    and the move is refused. The registry has no compare-and-set, so this is a re-read just before the move: on
    a local SQLite store the re-read and the move hold one lock (no window); on a tracking server a window of one
    request is left."""
    if force and not reason:
        raise ConfigError("a forced promotion needs a reason (--reason TEXT): it is recorded with the move")
    version = str(version or _alias_version(client, model_name, CHALLENGER) or "")
    if not version:
        raise PromotionRefused(f"{model_name} has no {CHALLENGER}: give --version, or run a build first")
    tags = client.get_model_version(model_name, version).tags
    verdict = tags.get("adaptflow.gates", "none")
    previous = _alias_version(client, model_name, CHAMPION)
    record = {"model": model_name, "version": version, "previous": previous, "gates": verdict, "forced": force,
              "by": user or getpass.getuser()}
    if verdict != "passed" and not force:
        failed = [f"{k.removeprefix('adaptflow.gate.')} ({v.removeprefix('FAIL: ')})" for k, v in sorted(tags.items())
                  if k.startswith("adaptflow.gate.") and v.startswith("FAIL")]
        why = "gates failed: " + "; ".join(failed) if verdict == "failed" else \
            "no promotion gate judged it (verdict none): set evaluation.gates in the recipe"
        record |= {"action": "refused", "reason": why}
        _audit(client, record)
        raise PromotionRefused(f"{model_name} version {version} stays out of service: {record['reason']} "
                               f"({CHAMPION} remains {previous or 'unset'}; --force --reason TEXT overrides)")
    with _alias_lock(client):
        while True:
            current = _alias_version(client, model_name, CHAMPION)
            if expected_champion != ANY and current != expected_champion:
                record |= {"previous": current, "action": "refused",
                           "reason": f"{CHAMPION} moved from {expected_champion or 'unset'} to {current or 'unset'} "
                                     "after this decision was made against it"}
                _audit(client, record)
                raise PromotionRefused(f"{model_name} version {version} was not promoted: {record['reason']}; "
                                       f"compare against the new {CHAMPION} (rebuild), or promote by hand")
            if _set_alias(client, model_name, CHAMPION, version):
                break
        # recorded under the lock too: rollback reads the trail in order, so it must be the order of the moves
        record |= {"previous": current, "action": "promote", "reason": reason or f"gates {verdict}"}
        _audit(client, record)
    return record


def rollback(client, model_name: str, *, reason: str | None = None, user: str | None = None) -> dict:
    """Return `champion` to the version it pointed at before the latest promotion still in effect."""
    with _alias_lock(client):  # the trail read, the move and its record: one step against concurrent promotions
        stack: list[str] = []
        for entry in audit_trail(client, model_name):
            if entry["action"] == "promote":
                stack.append(entry["version"])
            elif entry["action"] == "rollback" and stack:
                stack.pop()
        if len(stack) < 2:
            raise PromotionRefused(f"{model_name}: no earlier {CHAMPION} to return to")
        current, target = stack[-1], stack[-2]
        client.set_registered_model_alias(model_name, CHAMPION, target)
        record = {"model": model_name, "action": "rollback", "version": target, "previous": current,
                  "forced": False,
                  "gates": client.get_model_version(model_name, target).tags.get("adaptflow.gates", "none"),
                  "reason": reason or "rollback", "by": user or getpass.getuser()}
        _audit(client, record)
    return record


def audit_trail(client, model_name: str) -> list[dict]:
    """Every promotion decision on `model_name`, oldest first."""
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`adaptflow.audit.model` = '{model_name}'",
                              order_by=["attributes.start_time ASC"], max_results=50_000)
    trail = [{k.removeprefix("adaptflow.audit."): v for k, v in run.data.tags.items()
              if k.startswith("adaptflow.audit.")} | {"run_id": run.info.run_id} for run in runs]
    return sorted(trail, key=lambda entry: int(entry["ns"]))


def _audit(client, record: dict) -> None:
    experiment_id = ensure_experiment(client, AUDIT_EXPERIMENT, None)
    record |= {"at": datetime.now(UTC).isoformat(timespec="seconds"), "ns": time.time_ns()}  # ns orders the trail
    run = client.create_run(experiment_id, run_name=f"{record['action']} {record['model']} v{record['version']}",
                            tags={f"adaptflow.audit.{k}": str(v) for k, v in record.items() if v is not None})
    client.set_terminated(run.info.run_id)


@contextlib.contextmanager
def champion_checkpoint(client, model_name: str):
    """(version, CheckpointRef of a temporary HF checkpoint) of the current champion, or None; the files are
    removed when the block ends."""
    version = _alias_version(client, model_name, CHAMPION)
    if version is None:
        yield None
        return
    run_id = client.get_model_version(model_name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "model", tmp))
        checkpoint = local / "model"
        for file in (local / "components" / "tokenizer").iterdir():  # one folder, as save_pretrained writes it
            shutil.copy2(file, checkpoint / file.name)
        yield version, CheckpointRef(uri=str(checkpoint), digest="", stage="champion")


def _alias_lock(client):
    """Exclusive, across processes, while a champion is re-read and moved — on a local SQLite registry; a
    tracking server offers no lock, so there it is a no-op."""
    uri = getattr(client, "_registry_uri", None) or ""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return sqlite_store_lock(Path(uri.removeprefix("sqlite:///")), "aliases")


def _set_alias(client, model_name: str, alias: str, version: str) -> bool:
    """Point `alias` at `version`; False when another writer created the alias in the same moment (the store
    inserts a new alias, and the second insert fails): the caller reads it again and decides again."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(model_name, alias, version)
    except MlflowException as err:
        if "UNIQUE constraint failed: registered_model_aliases" in str(err) or "Duplicate entry" in str(err):
            return False
        raise
    return True


def _alias_version(client, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None
