"""The `adaptflow` command line.

    adaptflow validate domains/biomedical.yaml [--set stages.pretrain.lr=5e-5]
    adaptflow build domains/biomedical.yaml [--set k=v ...] [--tracking-uri URI] [--summary-json PATH]
                                            [--max-steps N] [--max-examples N]
    adaptflow node WORKDIR --node-rank K     # nodes 1 … N-1 of a multi-node torchrun build
    adaptflow promote MODEL [--version N] [--force --reason TEXT] [--rollback]
    adaptflow report RUN_ID [--out DIR]      # a build's HTML report, written locally
    adaptflow rerun RUN_ID --from finetune [--set k=v ...]   # reuse the stages before, recompute from it
    adaptflow status [--domain D]            # recent builds: stages, durations, reuse, registered version
    adaptflow deploy domains/*.yaml --pool adaptflow         # Prefect deployments on each recipe's schedule
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from adaptflow.errors import AdaptflowError, RecipeError
from adaptflow.tracking.report import HEADLINE_METRICS

if TYPE_CHECKING:
    from adaptflow.recipe import Recipe

app = typer.Typer(help="Build domain-specialised language models as tracked, multi-stage workflows.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True)


TrackingOption = Annotated[str | None, typer.Option(
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the default workdir's SQLite)")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: a.b.c=value")]


@app.command()
def validate(recipe: Path, overrides: SetOption = None) -> None:
    """Check a recipe and its inputs; list every problem and exit non-zero if there is any."""
    loaded = _load_or_exit(recipe, overrides or [])
    stages = ", ".join(loaded.enabled_stages()) or "none"
    tasks = f"; tasks: {', '.join(loaded.used_tasks())}" if loaded.used_tasks() else ""
    console.print(f"[green]ok[/green] {recipe}: domain {loaded.domain}; stages: {stages}; "
                  f"corpora: {', '.join(loaded.used_corpora())}{tasks}", soft_wrap=True)


@app.command()
def build(
    recipe: Path,
    overrides: SetOption = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: SQLite in workdir)")] = None,
    summary_json: Annotated[Path | None, typer.Option(help="Write the build summary here as JSON")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Cap every stage's optimizer steps")] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="Cap every dataset's size")] = None,
    progress: Annotated[bool, typer.Option(help="Show a training progress bar")] = True,
    reuse: Annotated[bool, typer.Option(help="Reuse finished stages with the same cache key")] = True,
) -> None:
    """Run a recipe's build flow (Prefect) with MLflow tracking; print the summary."""
    loaded = _load_or_exit(recipe, overrides or [], tracking_uri=tracking_uri)
    loaded.capped(max_steps=max_steps, max_examples=max_examples)  # caps must leave a valid recipe, too
    _run_build(summary_json, str(recipe), overrides=list(overrides or []), tracking_uri=tracking_uri,
               max_steps=max_steps, max_examples=max_examples, progress=progress, reuse=reuse)


@app.command()
def rerun(
    build_run_id: Annotated[str, typer.Argument(help="The build to rerun (its MLflow run id)")],
    from_stage: Annotated[str, typer.Option("--from", help="Recompute from this stage on (a stage the build ran, "
                                                           "e.g. finetune); earlier stages are reused")],
    overrides: SetOption = None,
    tracking_uri: TrackingOption = None,
    summary_json: Annotated[Path | None, typer.Option(help="Write the build summary here as JSON")] = None,
    progress: Annotated[bool, typer.Option(help="Show a training progress bar")] = True,
) -> None:
    """Start a new build from an earlier build's recipe (plus --set changes), recomputing from one stage on."""
    from adaptflow.tracking.reuse import rerun_recipe

    client = _tracking_client(tracking_uri)
    try:
        path = rerun_recipe(client, build_run_id, from_stage)
    except AdaptflowError as err:
        typer.echo(f"cannot rerun: {err}", err=True)
        raise typer.Exit(2) from None
    _load_or_exit(path, overrides or [], tracking_uri=client.tracking_uri)
    _run_build(summary_json, str(path), overrides=list(overrides or []), tracking_uri=client.tracking_uri,
               progress=progress, trigger="rerun", recompute_from=from_stage, rerun_of=build_run_id)


@app.command()
def status(
    domain: Annotated[str | None, typer.Option(help="Only this domain's builds")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many recent builds")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Recent builds, newest first: each stage's state, duration and reuse, and the registered version."""
    from adaptflow.tracking.report import format_duration
    from adaptflow.tracking.runs import recent_builds

    builds = recent_builds(_tracking_client(tracking_uri), domain=domain, limit=limit)
    if as_json:
        typer.echo(json.dumps(builds, indent=2))
        return
    if not builds:
        console.print("no builds yet" + (f" for domain {domain}" if domain else ""))
        return
    table = Table(title="recent builds" + (f" ({domain})" if domain else ""))
    for column in ("build run", "domain", "started", "trigger", "status", "stages", "registered"):
        table.add_column(column, overflow="fold")
    for build in builds:
        stages = "\n".join(f"{s['name']}: {s['status'].lower()} {format_duration(s['seconds'])}"
                           + (f" (reused {s['reused_from'][:8]})" if s.get("reused_from") else "")
                           for s in build["stages"])
        table.add_row(build["build_run_id"], build["domain"], build["started"], build["trigger"] or "",
                      build["status"], stages, build["registered_model"] or "")
    Console().print(table)


@app.command()
def deploy(
    recipes: Annotated[list[Path], typer.Argument(help="Recipes to deploy, e.g. domains/*.yaml")],
    pool: Annotated[str, typer.Option(help="Prefect work pool (a process pool, created when missing)")] = "adaptflow",
    overrides: SetOption = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for the deployed builds "
                                                           "(default: the worker's MLFLOW_TRACKING_URI)")] = None,
) -> None:
    """Create or update a Prefect deployment of the build flow per recipe, on the recipe's `schedule:`."""
    from adaptflow.flows.deploy import deploy_recipes

    for recipe in recipes:
        _load_or_exit(recipe, overrides or [])
    _configure_prefect()
    try:
        deployed = deploy_recipes(recipes, pool=pool, overrides=overrides, tracking_uri=tracking_uri)
    except AdaptflowError as err:
        typer.echo(f"not deployed: {err}", err=True)
        raise typer.Exit(2) from None
    for item in deployed:
        console.print(f"deployment {item.name} ({item.deployment_id}) in pool {pool}; schedule: {item.schedule}")
    console.print(f"start a worker: prefect worker start --pool {pool}")


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. adaptflow-biomedical")],
    version: Annotated[str | None, typer.Option(help="Version to promote (default: the challenger)")] = None,
    force: Annotated[bool, typer.Option(help="Promote even though its gates failed (needs --reason)")] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded with the move")] = None,
    rollback: Annotated[bool, typer.Option(help="Return champion to the version before the latest promotion")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Move the `champion` alias: to a version whose gates passed, or back. Every decision is audited."""
    from adaptflow.tracking import registry

    client = _tracking_client(tracking_uri)
    try:
        if rollback:
            record = registry.rollback(client, model, reason=reason)
        else:
            record = registry.promote(client, model, version=version, force=force, reason=reason)
    except AdaptflowError as err:
        typer.echo(f"not promoted: {err}", err=True)
        raise typer.Exit(1) from None
    console.print(f"{model}: champion → version {record['version']} (was {record['previous'] or 'unset'}; "
                  f"{record['reason']})")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="The build's MLflow run id (the summary's first line)")],
    out: Annotated[Path, typer.Option(help="Folder for report.html and plots/")] = Path("adaptflow-report"),
    tracking_uri: TrackingOption = None,
) -> None:
    """Write a build's HTML report (loss curves, metrics, gates, lineage) and its PNG plots locally."""
    from mlflow.exceptions import MlflowException

    from adaptflow.tracking.report import write_report

    client = _tracking_client(tracking_uri)
    try:
        if client.get_run(run_id).data.tags.get("adaptflow.kind") != "build":
            typer.echo(f"run {run_id} is not an adaptflow build run (tag adaptflow.kind=build); pass the build's "
                       "run id, not a stage's", err=True)
            raise typer.Exit(2)
    except MlflowException as err:
        typer.echo(f"no run {run_id} at {client.tracking_uri}: {err.message}", err=True)
        raise typer.Exit(2) from None
    path = write_report(client, run_id, out)
    console.print(f"report written to {path}")


@app.command()
def node(
    workdir: Annotated[Path, typer.Argument(help="The build's workdir, shared with node 0 (NFS, Lustre, …)")],
    node_rank: Annotated[int, typer.Option(min=1, help="This node's rank: 1 … nnodes-1")],
    idle_minutes: Annotated[float, typer.Option(help="Stop after this long without a new stage")] = 60,
) -> None:
    """Run on nodes 1 … N-1 of a multi-node build: start this node's ranks for each stage node 0 launches."""
    from adaptflow.launch import join_launches

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    joined = join_launches(workdir, node_rank, idle_minutes=idle_minutes)
    console.print(f"node {node_rank}: joined {joined} stage(s); no new stage for {idle_minutes:g} minutes")


def main() -> None:
    app()


def _run_build(summary_json: Path | None, recipe_path: str, **parameters) -> None:
    _configure_prefect()
    from adaptflow.flows.build import build as build_flow

    try:
        summary = build_flow(recipe_path, **parameters, checked=True)  # the caller ran `_load_or_exit`
    except AdaptflowError as err:
        typer.echo(f"build failed: {err}", err=True)
        raise typer.Exit(1) from None
    _print_summary(summary)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {summary_json}")


def _tracking_client(tracking_uri: str | None):
    from mlflow import MlflowClient

    default = f"sqlite:///{Path('adaptflow-runs').resolve()}/mlflow.db"  # the recipes' default workdir
    return MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default)


def _load_or_exit(path: Path, overrides: list[str], *, tracking_uri: str | None = None) -> Recipe:
    from adaptflow.preflight import preflight_problems
    from adaptflow.recipe import load_recipe

    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    problems = preflight_problems(recipe, tracking_uri)
    if problems:
        typer.echo(str(RecipeError(path.name, problems)), err=True)
        raise typer.Exit(2)
    return recipe


def _configure_prefect() -> None:
    """Defaults that make Prefect's local ephemeral API work out of the box here; the user's env wins."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")
    # No telemetry: these machines are often offline, and its first write races the SQLite schema setup.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reuse and champion downloads: log lines
    logging.getLogger("adaptflow").setLevel(logging.INFO)


def _print_mean_std(out: Console, metrics: dict, prefix: str, title: str, *, rows: str = r".+") -> None:
    """A table of `<prefix><name>_mean ± _std` for every name matching `rows` (nothing when there is none)."""
    names = sorted(m.group(1) for k in metrics if (m := re.fullmatch(re.escape(prefix) + r"(.+)_mean", k))
                   and re.fullmatch(rows, m.group(1)))
    if not names:
        return
    table = Table(title=title, min_width=56)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in names:
        table.add_row(name, f"{metrics[f'{prefix}{name}_mean']:.4f} ± {metrics[f'{prefix}{name}_std']:.4f}")
    out.print(table)


def _print_curation(out: Console, metrics: dict) -> None:
    """What corpus curation removed, filter by filter, and which evaluation sets the corpus overlapped."""
    from adaptflow.data.curation import FILTERS  # pulls in the data layer (pyarrow): not at start-up

    table = Table(title="corpus curation (documents; markup: documents cleaned; boilerplate: lines removed)")
    table.add_column("step")
    table.add_column("count", justify="right")
    table.add_row("documents in", f"{metrics['curate.documents_in']:,.0f}")
    for name in FILTERS:
        if (value := metrics.get(f"curate.removed.{name}")) is not None:
            table.add_row(name.replace("_", " "), f"{value:,.0f}")
    for key, value in metrics.items():
        if key.startswith("curate.contaminated_by."):
            table.add_row(f"  of which overlapping {key.removeprefix('curate.contaminated_by.')}", f"{value:,.0f}")
    table.add_row("documents kept", f"{metrics['curate.documents_kept']:,.0f}")
    out.print(table)


def _print_contributions(out: Console, stages: dict) -> None:
    """What each stage added: one measure of its input and of its output (stages that report one)."""
    rows = [(name, stage["contribution"]) for name, stage in stages.items() if "contribution" in stage]
    if not rows:
        return
    table = Table(title="what each stage contributed")
    for column, justify in (("stage", "left"), ("measure", "left"), ("input", "right"), ("output", "right"),
                            ("gain", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, c in rows:
        table.add_row(name, c["measure"], "—" if c["before"] is None else f"{c['before']:,.4f}",
                      f"{c['after']:,.4f}", "—" if c["gain"] is None else f"{c['gain']:+,.4f}")
    out.print(table)


def _print_summary(summary: dict) -> None:
    out = Console()
    table = Table(title=f"build {summary['build_run_id']} ({summary['domain']}): {summary['status']}")
    for column in ("stage", "run id", "status", "ranks", "checkpoint"):
        table.add_column(column, overflow="fold")
    for name, stage in summary["stages"].items():
        status = stage["status"] + (f" ({stage['guard']})" if "guard" in stage else "")
        if stage.get("reused_from"):
            status = f"reused {stage['reused_from']}"
        layout = str(stage.get("world_size", ""))
        if stage.get("zero_stage") is not None:
            layout += f" · ZeRO-{stage['zero_stage']}"
        table.add_row(name, stage["run_id"], status, layout, stage.get("checkpoint_uri") or "")
    out.print(table)
    for name, stage in summary["stages"].items():
        if "guard" in stage:
            out.print(f"negative-transfer guard on {name}: {stage['guard']} — {stage['guard_reason']}")
        for gate, verdict in stage.get("gates", {}).items():
            out.print(f"gate {gate}: {verdict}")
    _print_contributions(out, summary["stages"])
    if summary.get("gates") not in (None, "none"):
        out.print(f"promotion gates: {summary['gates']}")
    if summary.get("registered_model"):
        name, version = summary["registered_model"].rsplit("/", 1)
        out.print(f"registered {name} version {version} as challenger"
                  + (f"; {summary['promotion']}" if summary.get("promotion") else ""))
    if summary.get("report"):
        out.print(f"report: {summary['report']}")
    metrics = summary["metrics"]
    if "curate.documents_in" in metrics:
        _print_curation(out, metrics)
    seeds = sum(1 for name in summary["stages"] if name.startswith("finetune-seed"))
    _print_mean_std(out, metrics, "finetune.test_", f"task metrics (test set, mean ± std over {seeds} seed(s))")
    _print_mean_std(out, metrics, "eval.", f"evaluation (mean ± std over {seeds} seed(s))", rows=HEADLINE_METRICS)
    corpora = sorted(m.group(1) for k in metrics if (m := re.fullmatch(r"(\w+)_perplexity_before", k)))
    if corpora:
        ppl = Table(title="knowledge preservation: held-out (pseudo-)perplexity")
        for column in ("corpus", "before", "after", "change"):
            ppl.add_column(column, justify="right")
        for name in corpora:
            ppl.add_row(
                name,
                f"{metrics[f'{name}_perplexity_before']:,.2f}",
                f"{metrics[f'{name}_perplexity_after']:,.2f}",
                f"{metrics[f'{name}_perplexity_change_pct']:+.1f}%",
            )
        out.print(ppl)


if __name__ == "__main__":
    sys.exit(main())
