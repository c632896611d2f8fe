"""Stage reuse: a stage whose cache key matches an earlier finished run is not computed again.

    prior = find_reusable(client, experiment_id, key)          # the newest finished run with this key
    result = localise(client, prior, stage_dir, inputs=[base])  # its result, checkpoint paths valid here

The cache key hashes the stage's config, its input checkpoint's digest, its datasets' digests and the engine
version (`adaptflow.lineage.stage_cache_key`), so equal keys mean equal outputs. The earlier checkpoint is used
where it was written when it is still there with the same digest; otherwise it is downloaded from that run's
artifacts (so reuse works across machines when artifacts live on S3) and checked against the recorded digest.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adaptflow import stages

log = logging.getLogger(__name__)

RESULT_ARTIFACT = "stage_result.json"
RECIPE_ARTIFACT = "recipe.json"  # on every build run: the resolved recipe (defaults, YAML, overrides, caps)
REUSED_FROM = "adaptflow.reused_from"


@dataclass(frozen=True)
class PriorRun:
    run_id: str  # the run that computed the stage (a reusing run points at it)
    result: dict  # the stage's result as JSON (`dataclasses.asdict` of a CheckpointRef, FinetuneResult, …)
    metrics: dict[str, float]
    checkpoint_uri: str
    artifact_uri: str
    digest: str


def record_result(client, run_id: str, result: dict) -> None:
    """Keep a computed stage's result on its run, for later reuse."""
    client.log_dict(run_id, result, RESULT_ARTIFACT)


def find_reusable(client, experiment_id: str, key: str) -> PriorRun | None:
    """The newest FINISHED run with cache key `key` that recorded its result (and so a checkpoint)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`adaptflow.cache_key` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        origin_id = run.data.tags.get(REUSED_FROM, run.info.run_id)
        origin = run if origin_id == run.info.run_id else client.get_run(origin_id)
        tags = origin.data.tags
        if origin.info.status != "FINISHED" or "adaptflow.checkpoint.digest" not in tags:
            continue
        if (result := _load_json(client, origin_id, RESULT_ARTIFACT)) is None:
            continue
        return PriorRun(origin_id, result, dict(origin.data.metrics), tags.get("adaptflow.checkpoint.uri", ""),
                        tags.get("adaptflow.checkpoint.artifact_uri", ""), tags["adaptflow.checkpoint.digest"])
    return None


def localise(client, prior: PriorRun, stage_dir: Path, *, inputs: list[dict]) -> dict:
    """`prior.result` with every checkpoint reference pointing at a copy on this machine.

    A reference to one of this build's `inputs` (by digest: a guard that kept its input) becomes that input;
    the stage's own checkpoint is used in place or downloaded into `stage_dir/final`."""
    by_digest = {ref["digest"]: ref for ref in inputs}
    own: str | None = None

    def convert(value):
        nonlocal own
        if isinstance(value, dict) and {"uri", "digest", "stage"} <= value.keys():
            if value["digest"] in by_digest:
                return by_digest[value["digest"]]
            if value["digest"] == prior.digest or value["uri"] == prior.checkpoint_uri:
                own = own or _checkpoint_here(client, prior, stage_dir)
                return value | {"uri": own}
            return value
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return convert(prior.result)


def _checkpoint_here(client, prior: PriorRun, stage_dir: Path) -> str:
    for candidate in (Path(prior.checkpoint_uri), stage_dir / "final"):
        if candidate.is_dir() and _digest_or_none(candidate) == prior.digest:
            return str(candidate)
    if not prior.artifact_uri:
        raise FileNotFoundError(f"run {prior.run_id}'s checkpoint is gone from {prior.checkpoint_uri} and was "
                                "not logged as an artifact")
    final = stage_dir / "final"
    log.info("downloading run %s's checkpoint into %s", prior.run_id, final)
    stage_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stage_dir, prefix=".download-") as tmp:
        downloaded = Path(client.download_artifacts(prior.run_id, "checkpoint", tmp))
        if (got := _digest_or_none(downloaded)) != prior.digest:
            raise ValueError(f"run {prior.run_id}'s checkpoint artifact has digest {got}, its run recorded "
                             f"{prior.digest}: not reused")
        shutil.rmtree(final, ignore_errors=True)
        downloaded.rename(final)  # same filesystem: atomic, never a half-copied `final`
    return str(final)


def _digest_or_none(path: Path) -> str | None:
    from adaptflow.models.checkpoints import checkpoint_digest

    try:
        return checkpoint_digest(path)
    except Exception:  # noqa: BLE001 - no weights, unreadable: not this checkpoint
        return None


def rerun_recipe(client, build_run_id: str, from_stage: str) -> Path:
    """Write the resolved recipe of build `build_run_id` to `<workdir>/reruns/` for a rerun from `from_stage`;
    return its path. Refuses a run that is not a build, or a stage the build did not run."""
    from mlflow.exceptions import MlflowException

    from adaptflow.errors import ConfigError

    try:
        run = client.get_run(build_run_id)
    except MlflowException as err:
        raise ConfigError(f"no run {build_run_id} at {client.tracking_uri}: {err.message}") from None
    if run.data.tags.get("adaptflow.kind") != "build":
        raise ConfigError(f"run {build_run_id} is not an adaptflow build run; pass the build's run id, not a stage's")
    ran = run.data.tags.get("adaptflow.stages", "").split(",")
    if from_stage not in stages.names() or from_stage not in ran:
        choices = " | ".join(s for s in stages.names() if s in ran)
        raise ConfigError(f"--from {from_stage!r}: build {build_run_id} ran no such stage; choose {choices}")
    if (recipe := _load_json(client, build_run_id, RECIPE_ARTIFACT)) is None:
        raise ConfigError(f"build {build_run_id} recorded no {RECIPE_ARTIFACT} (built before reruns existed): "
                          "run `adaptflow build` with its recipe instead")
    path = Path(recipe["workdir"]) / "reruns" / f"{recipe['domain']}-rerun-of-{build_run_id[:8]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2))
    return path


def _load_json(client, run_id: str, path: str) -> dict | None:
    """A JSON artifact at the top of a run's artifacts, or None when the run has none by that name."""
    if not any(a.path == path for a in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
