"""The build flow: one recipe's stages, in order, each a task passing references.

    adaptflow build domains/biomedical.yaml                 # the CLI runs this flow
    python -m adaptflow.flows.build domains/tiny.yaml       # or directly
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, unmapped
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from adaptflow.errors import RecipeError
from adaptflow.preflight import preflight_problems
from adaptflow.recipe import load_recipe
from adaptflow.tasks.active_learning import select_examples
from adaptflow.tasks.adapt import adapt
from adaptflow.tasks.build_run import build_run
from adaptflow.tasks.curate import curate
from adaptflow.tasks.evaluate import evaluate
from adaptflow.tasks.finetune import finetune, select_seed
from adaptflow.tasks.prepare import prepare_data, prepare_model
from adaptflow.tasks.pretrain import pretrain
from adaptflow.tasks.register import register
from adaptflow.tasks.self_instruct import self_instruct
from adaptflow.tasks.tokens import tokenize
from adaptflow.tracking.runs import build_summary


def _run_name() -> str:
    return f"build-{Path(flow_run.parameters['recipe_path']).stem}"


# One task at a time: each training task already uses every core (and, later, every GPU of its launcher).
@flow(name="build", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=1))
def build(
    recipe_path: str,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    max_steps: int | None = None,
    max_examples: int | None = None,
    trigger: str = "manual",
    progress: bool = False,
    reuse: bool = True,
    recompute_from: str | None = None,
    rerun_of: str | None = None,
    checked: bool = False,
) -> dict:
    """Build one domain model from a recipe; return the build summary read back from MLflow.

    Stages whose cache key matches an earlier finished run are reused, not recomputed (`reuse=False`: none;
    `recompute_from="finetune"`: none from that stage on). The recipe's inputs are checked first, unless the
    caller did (`checked`: the CLI, which answers bad input before starting Prefect)."""
    recipe = load_recipe(recipe_path, overrides or []).capped(max_steps=max_steps, max_examples=max_examples)
    if not checked and (problems := preflight_problems(recipe, tracking_uri)):  # e.g. a deployed build
        raise RecipeError(Path(recipe_path).name, problems)
    with build_run(recipe, tracking_uri=tracking_uri, trigger=trigger, progress=progress, reuse=reuse,
                   recompute_from=recompute_from, rerun_of=rerun_of) as ctx:
        stages = recipe.enabled_stages()
        data = prepare_data(ctx)
        if "curate" in stages:
            data = curate(ctx, data)
        base = prepare_model(ctx, data)
        tokenize(ctx, base, data)  # the corpora read as blocks, into the token store (once across builds)
        language_model = pretrain(ctx, base, data) if "pretrain" in stages else base
        adaptation = adapt(ctx, language_model, data) if "adapt" in stages else None
        model = adaptation.checkpoint if adaptation else language_model
        if "self_instruct" in stages:
            data = self_instruct(ctx, model, data)
        if "active_learning" in stages:
            data = select_examples(ctx, model, data)
        finetuned, report, kind = None, None, None
        if "finetune" in stages:
            seeds = recipe.stages.finetune.seeds
            finetuned = finetune.map(unmapped(ctx), unmapped(model), unmapped(data), seed=seeds).result()
            model = select_seed(ctx, finetuned)
            kind = data.tasks[recipe.stages.finetune.task].kind
        if "evaluate" in stages:
            report = evaluate(ctx, base, language_model, finetuned, data)
        if recipe.registry.enabled:
            register(ctx, model, kind, report, adaptation)
    return build_summary(ctx.tracking.client(), ctx.build_run_id)


if __name__ == "__main__":
    print(build(sys.argv[1]))
