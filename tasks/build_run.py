"""The build's MLflow parent run: opened before the first stage, closed with the build's real status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from adaptflow.config import Recipe
from adaptflow.lineage import git_commit
from adaptflow.tracking import end_run, ensure_experiment, flatten, log_params, resolve_tracking, start_run
from tasks import BuildContext


@contextmanager
def build_run(
    recipe: Recipe, *, tracking_uri: str | None, trigger: str, progress: bool = False
) -> Iterator[BuildContext]:
    from prefect.context import get_run_context

    tracking = resolve_tracking(recipe.tracking, recipe.workdir, tracking_uri)
    client = tracking.client()
    experiment_id = ensure_experiment(client, recipe.experiment_name, tracking.artifact_location)
    flow_run = getattr(get_run_context(), "flow_run", None)
    run_id = start_run(
        client,
        experiment_id,
        f"build-{recipe.domain}",
        tags={
            "adaptflow.kind": "build",
            "adaptflow.domain": recipe.domain,
            "adaptflow.recipe_digest": recipe.digest(),
            "adaptflow.trigger": trigger,
            "adaptflow.stages": ",".join(recipe.enabled_stages()),
            "git_commit": git_commit(),
            "prefect.flow_run_id": flow_run.id if flow_run else None,
        },
    )
    try:
        log_params(client, run_id, flatten(recipe.model_dump(mode="json")))
        yield BuildContext(recipe, tracking, experiment_id, run_id, progress)
    except BaseException:
        end_run(client, run_id, failed=True)
        raise
    end_run(client, run_id)
