"""What the workflow costs on top of the work: a real biomedical build (MiniLM, PubMed abstracts → ChemProt).

    python bench/orchestration_overhead.py                 # the recipe's own budgets: ~16 min on 2 cores
    python bench/orchestration_overhead.py --max-steps 20  # a quick trial

1. The whole build flow (Prefect, MLflow on SQLite, artifacts, registration, report) on a fresh workdir, timed
   end to end, against the sum of its stages' compute (`compute_seconds` of pretrain, fine-tuning and
   evaluation: the engine's own work). Overhead = wall − compute, broken down. Prefect's ephemeral API is
   started (and timed) before, as a long-running server would be.
2. `adaptflow rerun <build> --from finetune` (pretraining reused, fine-tuning and evaluation recomputed)
   against the fine-tuning stage alone: `finetune.run` on the same inputs in this process, without Prefect
   or MLflow — the baseline, measured in the same run.

Prints a table, writes bench/orchestration_overhead.json, and ends with a key=value line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "domains" / "biomedical.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="cap every stage's steps (a quick trial)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "orchestration_overhead.json")
    args = parser.parse_args()
    os.environ.setdefault("ADAPTFLOW_DATA_ROOT", str(ROOT.parent / "shared" / "data"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from mlflow import MlflowClient
    from prefect import flow

    from adaptflow.data.labelled import prepare_task
    from adaptflow.flows.build import build
    from adaptflow.recipe import load_recipe
    from adaptflow.refs import CheckpointRef
    from adaptflow.stages import StageEnv, finetune
    from adaptflow.tracking.reuse import rerun_recipe

    workdir = Path(tempfile.mkdtemp(prefix="orchestration-bench-"))
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [f"workdir={workdir}"]

    started = time.perf_counter()
    flow(name="warm-up")(lambda: None)()
    server_start = time.perf_counter() - started

    started = time.perf_counter()
    summary = build(str(RECIPE), overrides=overrides, tracking_uri=tracking, max_steps=args.max_steps)
    build_wall = time.perf_counter() - started
    client = MlflowClient(tracking)
    stages = _stage_times(client, summary)

    path = rerun_recipe(client, summary["build_run_id"], "finetune")
    started = time.perf_counter()
    rerun = build(str(path), tracking_uri=tracking, trigger="rerun", recompute_from="finetune",
                  rerun_of=summary["build_run_id"])
    rerun_wall = time.perf_counter() - started
    rerun_stages = _stage_times(client, rerun)
    assert rerun_stages["pretrain"]["reused"] and not rerun_stages["finetune-seed13"]["reused"]

    # The fine-tuning stage alone: the engine call the flow makes, same inputs, no Prefect, no MLflow.
    recipe = load_recipe(RECIPE, overrides).capped(max_steps=args.max_steps)
    config = recipe.stages.finetune
    splits = prepare_task(config.task, recipe.tasks[config.task], out_dir=workdir / "datasets", seed=recipe.seed)
    pretrained = summary["stages"]["pretrain"]
    base = CheckpointRef(uri=pretrained["checkpoint_uri"], digest=client.get_run(pretrained["run_id"]).data.tags[
        "adaptflow.checkpoint.digest"], stage="pretrain")
    started = time.perf_counter()
    finetune.run(config, finetune.Inputs(base=base, task=splits), StageEnv(work_dir=workdir / "alone",
                                                                          seed=config.seeds[0]))
    finetune_alone = time.perf_counter() - started

    compute = sum(s["compute"] or 0.0 for s in stages.values())
    in_stages = sum(s["seconds"] for s in stages.values())
    result = {
        "recipe": str(RECIPE.relative_to(ROOT)), "max_steps": args.max_steps, "prefect_server_start_s": server_start,
        "build_wall_s": build_wall, "stage_compute_s": compute, "overhead_s": build_wall - compute,
        "overhead_pct": 100 * (build_wall - compute) / build_wall,
        "overhead_breakdown_s": {
            "prepare (read, dedupe, split, digest data)": stages["prepare"]["seconds"],
            "stage runs beyond compute (loading, checkpoint uploads, tracking)":
                in_stages - compute - stages["prepare"]["seconds"],
            "outside stage runs (Prefect, registration, report)": build_wall - in_stages,
        },
        "stages": stages, "rerun_wall_s": rerun_wall, "rerun_stages": rerun_stages,
        "finetune_alone_s": finetune_alone, "rerun_vs_finetune_alone": rerun_wall / finetune_alone,
        "rerun_without_evaluation_vs_finetune_alone":
            (rerun_wall - rerun_stages["evaluate"]["seconds"]) / finetune_alone,
        "rerun_vs_full_build": rerun_wall / build_wall,
    }
    args.out.write_text(json.dumps(result, indent=2))
    _print(result)


def _stage_times(client, summary: dict) -> dict:
    out = {}
    for name, stage in summary["stages"].items():
        run = client.get_run(stage["run_id"])
        out[name] = {"seconds": (run.info.end_time - run.info.start_time) / 1000,
                     "compute": run.data.metrics.get("compute_seconds"),
                     "reused": "adaptflow.reused_from" in run.data.tags}
    return out


def _print(r: dict) -> None:
    print(f"\nPrefect ephemeral API start (before the build, as a running server would be): "
          f"{r['prefect_server_start_s']:.1f} s")
    print(f"\n{'build stage':<18}{'run s':>9}{'compute s':>11}")
    for name, s in r["stages"].items():
        compute = f"{s['compute']:.1f}" if s["compute"] is not None else "-"
        print(f"{name:<18}{s['seconds']:>9.1f}{compute:>11}")
    print(f"\nwhole build flow    {r['build_wall_s']:8.1f} s")
    print(f"stage compute       {r['stage_compute_s']:8.1f} s")
    print(f"overhead            {r['overhead_s']:8.1f} s  ({r['overhead_pct']:.1f} % of the build)")
    for what, seconds in r["overhead_breakdown_s"].items():
        print(f"  {what:<66}{seconds:7.1f} s")
    print(f"\n{'rerun stage':<18}{'run s':>9}  reused")
    for name, s in r["rerun_stages"].items():
        print(f"{name:<18}{s['seconds']:>9.1f}  {'yes' if s['reused'] else ''}")
    print(f"\nrerun --from finetune {r['rerun_wall_s']:8.1f} s")
    print(f"fine-tuning alone     {r['finetune_alone_s']:8.1f} s   (baseline: finetune.run, no Prefect/MLflow)")
    print(f"ratio rerun / alone   {r['rerun_vs_finetune_alone']:8.2f}   (the rerun also re-evaluates)")
    print(f"  without evaluation  {r['rerun_without_evaluation_vs_finetune_alone']:8.2f}")
    print(f"ratio rerun / build   {r['rerun_vs_full_build']:8.2f}")
    print(f"flow_overhead_pct={r['overhead_pct']:.1f} rerun_vs_finetune_alone={r['rerun_vs_finetune_alone']:.2f} "
          f"rerun_without_evaluation_vs_finetune_alone={r['rerun_without_evaluation_vs_finetune_alone']:.2f} "
          f"rerun_vs_full_build={r['rerun_vs_full_build']:.2f}")


if __name__ == "__main__":
    main()
