"""Deployments: each recipe becomes a Prefect deployment of the build flow, on its `schedule:` when it has one.

    export PREFECT_API_URL=http://127.0.0.1:4200/api          # a Prefect server (prefect server start)
    adaptflow deploy domains/biomedical.yaml domains/legal.yaml --pool adaptflow
    prefect worker start --pool adaptflow                       # runs the builds, scheduled or triggered
    prefect deployment run build/biomedical                     # a build now
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adaptflow.errors import ConfigError
from adaptflow.recipe import load_recipe

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/build.py:build"


@dataclass(frozen=True)
class Deployed:
    name: str  # build/<domain>
    deployment_id: str
    schedule: str  # "0 2 * * * (UTC)" or "none"


def deploy_recipes(paths: list[str | Path], *, pool: str, overrides: list[str] | None = None,
                   tracking_uri: str | None = None) -> list[Deployed]:
    """Create or update one deployment per recipe (named after its domain) in work pool `pool`."""
    from prefect.schedules import Cron

    from adaptflow.flows.build import build

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("deployments live on a Prefect server: start one (`prefect server start`) and set "
                          "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    recipes = [(Path(path), load_recipe(path, overrides or [])) for path in paths]  # all valid before any change
    _ensure_pool(pool)
    deployed = []
    for path, recipe in recipes:
        schedule = recipe.schedule
        flow = build.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINT)
        deployment_id = flow.deploy(
            name=recipe.domain,
            work_pool_name=pool,
            schedules=[Cron(schedule.cron, timezone=schedule.timezone, active=schedule.active)] if schedule else [],
            parameters={"recipe_path": _portable(path), "overrides": list(overrides or []),
                        "tracking_uri": tracking_uri, "trigger": "deployment"},
            description=recipe.description or f"adaptflow build of {path.name}",
            tags=["adaptflow", f"domain:{recipe.domain}"],
            version=recipe.digest(),
            build=False, push=False, print_next_steps=False, ignore_warnings=True,
        )
        deployed.append(Deployed(f"build/{recipe.domain}", str(deployment_id),
                                 f"{schedule.cron} ({schedule.timezone})" if schedule else "none"))
    return deployed


def _portable(path: Path) -> str:
    """A recipe inside the project as a path relative to it: the worker runs from its own copy of the project."""
    resolved = path.resolve()
    return str(resolved.relative_to(PROJECT_ROOT)) if resolved.is_relative_to(PROJECT_ROOT) else str(resolved)


def _ensure_pool(pool: str) -> None:
    """A `process` work pool named `pool`, created when missing (as `prefect worker start` would)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass
