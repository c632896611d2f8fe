"""MLflow tracking through an explicit `MlflowClient` and run ids (no global active-run state).

Default store: SQLite plus a local artifact folder under the recipe's workdir. Precedence of the tracking URI:
`--tracking-uri` > `MLFLOW_TRACKING_URI` > the recipe's `tracking.uri` > the default.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptflow.config.sections import TrackingConfig
from adaptflow.refs import DatasetRef

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_CHARS = 6000
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# Secrets carried in query strings: tokens, passwords, pre-signed URL signatures and credentials.
_QUERY_SECRET = re.compile(r"(?i)([?&](?:[\w-]*token|password|passwd|secret|sig|signature|x-amz-signature|"
                           r"x-amz-credential|x-amz-security-token|api[_-]?key)=)[^&\s#]+")


@dataclass(frozen=True)
class TrackingTarget:
    uri: str
    artifact_location: str | None

    def client(self):
        from mlflow import MlflowClient

        if not self.uri.startswith("sqlite:///"):
            return MlflowClient(tracking_uri=self.uri)
        with _sqlite_schema_lock(Path(self.uri.removeprefix("sqlite:///"))):
            client = MlflowClient(tracking_uri=self.uri)  # opens the tracking store
            client._get_registry_client().store  # noqa: B018 - and the registry's: both create or migrate tables
        return client


@contextmanager
def _sqlite_schema_lock(database: Path) -> Iterator[None]:
    """One process at a time opens an SQLite store: opening it creates or migrates its schema, and two builds
    doing that at once fail ("table _alembic_tmp_experiments already exists"). MLflow keeps an opened store for
    the rest of the process, so only a process's first client waits."""
    database.parent.mkdir(parents=True, exist_ok=True)
    with sqlite_store_lock(database, "schema"):
        yield


@contextmanager
def sqlite_store_lock(database: Path, purpose: str) -> Iterator[None]:
    """An exclusive lock, across processes, on `purpose` of the SQLite store `database` (a file beside it)."""
    import fcntl

    suffix = "" if purpose == "schema" else f".{purpose}"  # the schema lock's file name predates the others
    with open(database.with_name(f".{database.name}{suffix}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_tracking(config: TrackingConfig, workdir: str | Path, override: str | None = None) -> TrackingTarget:
    workdir = Path(workdir).resolve()
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or config.uri
    if uri is None:
        workdir.mkdir(parents=True, exist_ok=True)
        return TrackingTarget(uri=f"sqlite:///{workdir / 'mlflow.db'}", artifact_location=str(workdir / "mlartifacts"))
    if config.artifact_location is None and uri.startswith(("sqlite:", "file:")):
        # A local store keeps its artifacts under the workdir too (MLflow's default is ./mlruns of wherever the
        # command happened to run). A tracking server decides for itself.
        return TrackingTarget(uri=uri, artifact_location=str(workdir / "mlartifacts"))
    return TrackingTarget(uri=uri, artifact_location=config.artifact_location)


def redact(text: str) -> str:
    """Drop credentials embedded in URIs: scheme://user:password@host, and tokens, passwords or signatures in
    query strings."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("***@", text))


def redact_tree(value):
    """`redact` applied to every string of a JSON-like structure."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return value


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created when missing (by this build, or by another one at the same moment)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = f"{artifact_location.rstrip('/')}/{name}" if artifact_location else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if (experiment := client.get_experiment_by_name(name)) is None:
            raise
        log.debug("experiment %s was created by another build meanwhile (%s)", name, err.error_code)
        return experiment.experiment_id


def start_run(client, experiment_id: str, name: str, *, tags: dict[str, Any], parent_run_id: str | None = None) -> str:
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def end_run(client, run_id: str, *, failed: bool = False) -> None:
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config → MLflow params `a.b.c = value` (values redacted and truncated to MLflow's limit)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            out[name] = redact(text)[:MAX_PARAM_CHARS]
    return out


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-batch parameter limit
        client.log_batch(run_id, params=items[start : start + 100])


def metrics_logger(client, run_id: str, prefix: str = ""):
    """A `MetricsSink` for the training loop: one batched write per call."""
    from mlflow.entities import Metric

    def log_metrics(step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()])

    return log_metrics


def log_dataset(client, run_id: str, ref: DatasetRef, *, context: str, source_uri: str | None = None) -> None:
    """Record a dataset input (its real path/URI as source, content digest, row count) on a run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways": a local path is local
        source = resolve_dataset_source(ref.uri)
    profile = {"num_rows": ref.rows}
    if source_uri:
        profile["prepared_from"] = redact(source_uri)
    dataset = Dataset(
        name=ref.name or Path(ref.uri).stem,
        digest=ref.digest,
        source_type=source._get_source_type(),
        source=source.to_json(),
        profile=json.dumps(profile),
    )
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as err:
        # The store looks the dataset up, then inserts it: another build logging the same dataset in between
        # wins the insert. The dataset now exists; logging again links it to this run.
        if "UNIQUE constraint failed: datasets" not in str(err) and "Duplicate entry" not in str(err):
            raise
        client.log_inputs(run_id, datasets=inputs)


def log_directory(client, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
    """Upload a directory as run artifacts; return its artifact URI."""
    client.log_artifacts(run_id, str(local_dir), artifact_path=artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def child_runs(client, parent, *, status: str | None = None) -> list:
    """A run's child runs (a build's stages), oldest first; only those in `status` when given."""
    where = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs([parent.info.experiment_id], filter_string=where, order_by=["attributes.start_time ASC"])


def build_summary(client, build_run_id: str) -> dict:
    """What a build did, read back from MLflow: `{build_run_id, domain, status, metrics, stages: {...}}`."""
    parent = client.get_run(build_run_id)
    return summarise(parent, child_runs(client, parent))


def summarise(parent, children: list) -> dict:
    """`build_summary` of an already fetched build run and its stage runs."""
    build_run_id = parent.info.run_id
    stages = {
        run.info.run_name: {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "metrics": dict(run.data.metrics),
            "checkpoint_uri": run.data.tags.get("adaptflow.checkpoint.uri"),
            "artifact_uri": run.data.tags.get("adaptflow.checkpoint.artifact_uri"),
            **({"world_size": int(run.data.tags["adaptflow.world_size"]),
                "zero_stage": int(z) if (z := run.data.tags.get("adaptflow.zero_stage")) else None}
               if "adaptflow.world_size" in run.data.tags else {}),
            **({"reused_from": run.data.tags["adaptflow.reused_from"]} if "adaptflow.reused_from" in run.data.tags
               else {}),
            **({"guard": run.data.tags["adaptflow.guard"], "guard_reason": run.data.tags.get("adaptflow.guard.reason")}
               if "adaptflow.guard" in run.data.tags else {}),
            **({"gates": {k.removeprefix("adaptflow.gate."): v for k, v in sorted(run.data.tags.items())
                          if k.startswith("adaptflow.gate.")}} if "adaptflow.gates" in run.data.tags else {}),
            **({"contribution": {"measure": run.data.tags["adaptflow.contribution"],
                                 **{part: run.data.metrics.get(f"contribution_{part}")
                                    for part in ("before", "after", "gain")}}}
               if "adaptflow.contribution" in run.data.tags else {}),
        }
        for run in children
    }
    return {
        "build_run_id": build_run_id,
        "experiment_id": parent.info.experiment_id,
        "domain": parent.data.tags.get("adaptflow.domain"),
        "status": parent.info.status,
        "trigger": parent.data.tags.get("adaptflow.trigger"),
        "rerun_of": parent.data.tags.get("adaptflow.rerun_of"),
        "metrics": dict(parent.data.metrics),
        "gates": parent.data.tags.get("adaptflow.gates"),
        "registered_model": parent.data.tags.get("adaptflow.registered_model"),
        "promotion": parent.data.tags.get("adaptflow.promotion"),
        "report": parent.data.tags.get("adaptflow.report"),
        "stages": stages,
    }


def run_seconds(info) -> float | None:
    """A run's duration so far (to now while it is running)."""
    if info.start_time is None:
        return None
    return ((info.end_time or int(time.time() * 1000)) - info.start_time) / 1000


def recent_builds(client, *, domain: str | None = None, limit: int = 10) -> list[dict]:
    """The newest build runs in every experiment (or one domain's), each with its stages' state, duration and
    reuse: what `adaptflow status` shows."""
    from datetime import datetime

    where = "tags.`adaptflow.kind` = 'build'" + (f" and tags.`adaptflow.domain` = '{domain}'" if domain else "")
    experiments = [e.experiment_id for e in client.search_experiments()]
    builds = client.search_runs(experiments, filter_string=where, order_by=["attributes.start_time DESC"],
                                max_results=limit)
    out = []
    for run in builds:
        children = child_runs(client, run)
        tags = run.data.tags
        out.append({
            "build_run_id": run.info.run_id,
            "domain": tags.get("adaptflow.domain"),
            "started": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
            "seconds": run_seconds(run.info),
            "status": run.info.status,
            "trigger": tags.get("adaptflow.trigger"),
            "registered_model": tags.get("adaptflow.registered_model"),
            "stages": [{"name": c.info.run_name, "status": c.info.status, "seconds": run_seconds(c.info),
                        "reused_from": c.data.tags.get("adaptflow.reused_from")} for c in children],
        })
    return out
