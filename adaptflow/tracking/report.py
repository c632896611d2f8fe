"""The build report: one self-contained HTML page per build, read back from MLflow.

    write_report(client, build_run_id, out_dir)    # out_dir/report.html + out_dir/plots/*.png
    publish_report(client, build_run_id)           # the same, logged to the build's run under `report/`
    adaptflow report RUN_ID [--out DIR]            # the CLI: write any build's report locally

Sections: summary, stages, loss curves (one plot per training stage), evaluation (task, OOD, calibration,
robustness, knowledge preservation, per seed), promotion gates, lineage (datasets → stage checkpoints →
registered version). The PNG plots are embedded in the page as data URIs, so the page alone is the report.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from adaptflow.tracking.runs import child_runs, run_seconds, summarise

REPORT_DIR = "report"
# The evaluation's headline rows (here and in the CLI's summary): task and OOD scores, calibration, robustness.
HEADLINE_METRICS = r"(test|ood_\w+?)_(macro_f1|micro_f1|entity_f1|accuracy|ece)|robust_\w+_drop|robustness_drop_max"
SECTIONS = ("summary", "stages", "loss-curves", "evaluation", "gates", "lineage")
# Step-wise metrics of a training stage that are worth a curve: every loss (train, eval, task, domain).
_CURVE = re.compile(r"(\w+_)?loss")


@dataclass
class StageRecord:
    name: str
    run_id: str
    status: str
    seconds: float | None
    metrics: dict[str, float]
    tags: dict[str, str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)


@dataclass
class BuildRecord:
    summary: dict
    tags: dict[str, str]
    seconds: float | None
    stages: list[StageRecord]
    gates: list[dict]
    version: dict | None  # the registered model version: name, version, aliases, source, tags

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary["metrics"]


def collect(client, build_run_id: str, *, status: str | None = None) -> BuildRecord:
    """Everything the report shows, from the tracking server. `status` overrides the run's own (a build writes
    its report just before it closes its run)."""
    parent = client.get_run(build_run_id)
    children = child_runs(client, parent)
    summary = summarise(parent, children)
    if status:
        summary["status"] = status
    stages = [_stage_record(client, run) for run in children]
    evaluate = next((s for s in stages if s.name == "evaluate"), None)
    gates = _gates(evaluate) if evaluate else []
    return BuildRecord(summary, dict(parent.data.tags), run_seconds(parent.info), stages, gates,
                       _registered_version(client, summary.get("registered_model")))


def write_report(client, build_run_id: str, out_dir: str | Path, *, status: str | None = None) -> Path:
    """Write `report.html` and `plots/*.png` under `out_dir`; return the HTML's path."""
    out_dir = Path(out_dir)
    record = collect(client, build_run_id, status=status)
    plots = draw_plots(record, out_dir / "plots")
    path = out_dir / "report.html"
    path.write_text(render(record, plots), encoding="utf-8")
    return path


def publish_report(client, build_run_id: str, *, status: str | None = None) -> str:
    """Write the report and log it to the build's run (artifact folder `report/`); return the page's URI."""
    with tempfile.TemporaryDirectory(prefix="adaptflow-report-") as tmp:
        write_report(client, build_run_id, tmp, status=status)
        client.log_artifacts(build_run_id, tmp, artifact_path=REPORT_DIR)
    uri = f"{client.get_run(build_run_id).info.artifact_uri.rstrip('/')}/{REPORT_DIR}/report.html"
    client.set_tag(build_run_id, "adaptflow.report", uri)
    return uri


# ---- reading MLflow ---------------------------------------------------------------------------------------------


def _stage_record(client, run) -> StageRecord:
    run_id = run.info.run_id
    curves = {}
    trained_in = run.data.tags.get("adaptflow.reused_from", run_id)  # a reused stage: the curves of its origin
    for key in sorted(run.data.metrics):
        if _CURVE.fullmatch(key) and not key.startswith("test_"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(trained_in, key))
            if len(history) > 1:
                curves[key] = history
    datasets = []
    for item in run.inputs.dataset_inputs:
        source = json.loads(item.dataset.source or "{}")
        profile = json.loads(item.dataset.profile or "{}")
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        datasets.append({"name": item.dataset.name, "digest": item.dataset.digest, "context": context,
                         "rows": profile.get("num_rows"), "source": profile.get("prepared_from")
                         or source.get("uri") or source.get("url") or source.get("path") or ""})
    return StageRecord(run.info.run_name, run_id, run.info.status, run_seconds(run.info), dict(run.data.metrics),
                       dict(run.data.tags), curves, datasets)


def _registered_version(client, registered: str | None) -> dict | None:
    if not registered:
        return None
    name, version = registered.rsplit("/", 1)
    mv = client.get_model_version(name, version)
    return {"name": name, "version": version, "aliases": sorted(mv.aliases), "source": mv.source,
            "tags": dict(mv.tags)}


def _gates(evaluate: StageRecord) -> list[dict]:
    """Each gate's verdict as the evaluation stage logged it: `adaptflow.gate.<name>` tags (verdict: reason) and
    `gate.<name>.value|threshold|passed` metrics."""
    gates = []
    for key, text in sorted(evaluate.tags.items()):
        if not key.startswith("adaptflow.gate."):
            continue
        name = key.removeprefix("adaptflow.gate.")
        verdict, _, reason = text.partition(": ")
        gates.append({"name": name, "value": evaluate.metrics.get(f"gate.{name}.value"),
                      "threshold": evaluate.metrics.get(f"gate.{name}.threshold"), "passed": verdict == "pass",
                      "reason": reason})
    return gates


# ---- plots ------------------------------------------------------------------------------------------------------


def draw_plots(record: BuildRecord, out_dir: Path) -> dict[str, Path]:
    """PNG plots: `loss-<stage>` for each stage with curves, `perplexity`, `robustness`. Returns name → path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}

    def save(name: str, fig) -> None:
        fig.tight_layout()
        plots[name] = out_dir / f"{name}.png"
        fig.savefig(plots[name], dpi=110)
        plt.close(fig)

    for stage in record.stages:
        if not stage.curves:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        for key, points in sorted(stage.curves.items(), key=lambda item: not _is_training_curve(item[0])):
            steps, values = zip(*points, strict=True)
            training = _is_training_curve(key)
            ax.plot(steps, values, label=key, marker=None if training else "o", linewidth=1.4 if training else 1)
        reused = stage.tags.get("adaptflow.reused_from")
        title = f"{stage.name}: loss" + (f" (reused from run {reused[:8]})" if reused else "")
        ax.set(title=title, xlabel="optimizer step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(f"loss-{stage.name}", fig)

    corpora = _perplexity_corpora(record.metrics)
    if corpora:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        xs = range(len(corpora))
        before = [record.metrics[f"{c}_perplexity_before"] for c in corpora]
        after = [record.metrics[f"{c}_perplexity_after"] for c in corpora]
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="base model")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label="this build")
        ax.set_xticks(list(xs), corpora)
        ax.set_yscale("log")
        ax.set(title="held-out (pseudo-)perplexity, lower is better", ylabel="perplexity (log scale)")
        ax.legend(fontsize=8)
        save("perplexity", fig)

    robust = _robustness_rows(record.metrics)
    if robust:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        names = [name for name, *_ in robust]
        ax.bar(names, [mean for _, mean, _ in robust], yerr=[std for *_, std in robust], capsize=4, color="#c0504d")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title="task-metric drop under seeded noise (mean ± std over seeds)", ylabel="drop from clean")
        save("robustness", fig)
    return plots


def _is_training_curve(key: str) -> bool:
    """`loss`, `task_loss`, … are logged every few steps; `eval_loss`, `val_loss` at evaluations (markers)."""
    return not key.startswith(("val_", "eval_"))


def _perplexity_corpora(metrics: dict) -> list[str]:
    return sorted(m.group(1) for k in metrics if (m := re.fullmatch(r"(\w+)_perplexity_before", k)))


def _robustness_rows(metrics: dict) -> list[tuple[str, float, float]]:
    rows = [(m.group(1), v, metrics.get(f"eval.robust_{m.group(1)}_drop_std", 0.0))
            for k, v in metrics.items() if (m := re.fullmatch(r"eval\.robust_(\w+)_drop_mean", k))]
    return sorted(rows)


# ---- HTML -------------------------------------------------------------------------------------------------------


def render(record: BuildRecord, plots: dict[str, Path]) -> str:
    """The page: a Jinja2 template (autoescaped) with every plot inlined."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("adaptflow.tracking", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _number
    env.filters["duration"] = format_duration
    images = {name: "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() for name, path in
              plots.items()}
    metrics = record.metrics
    names = sorted(m.group(1) for k in metrics if (m := re.fullmatch(r"eval\.(.+)_mean", k)))
    evaluation = [(name, metrics[f"eval.{name}_mean"], metrics.get(f"eval.{name}_std"))
                  for name in names if re.fullmatch(HEADLINE_METRICS, name)]
    per_seed = _per_seed(record)
    return env.get_template("report.html.j2").render(
        r=record, s=record.summary, images=images, sections=SECTIONS, evaluation=evaluation,
        perplexity=[(c, metrics[f"{c}_perplexity_before"], metrics[f"{c}_perplexity_after"],
                     metrics[f"{c}_perplexity_change_pct"]) for c in _perplexity_corpora(metrics)],
        robustness=_robustness_rows(metrics), per_seed=per_seed,
        seed_columns=sorted({k for row in per_seed.values() for k in row}),
        chain=lineage_chain(record), datasets=_datasets(record),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        champion={k: metrics[k] for k in metrics if k.startswith("champion_")},
    )


def _per_seed(record: BuildRecord) -> dict[str, dict[str, float]]:
    """`seed<k>/<metric>` from the evaluation stage → {seed: {metric: value}} (test, OOD and robustness)."""
    evaluate = next((s for s in record.stages if s.name == "evaluate"), None)
    rows: dict[str, dict[str, float]] = {}
    for key, value in (evaluate.metrics if evaluate else {}).items():
        if (m := re.fullmatch(r"seed(\d+)/(.+)", key)) and re.fullmatch(HEADLINE_METRICS, m.group(2)):
            rows.setdefault(m.group(1), {})[m.group(2)] = value
    return dict(sorted(rows.items(), key=lambda item: int(item[0])))


def lineage_chain(record: BuildRecord) -> list[dict]:
    """The model's chain, walked back by digest from the registered (else the last) checkpoint: base model →
    each stage that changed the model → registered version. A stage that passed its input through unchanged
    (a rejected adaptation) is shown where it did so, as `kept`."""
    produced: dict[str, StageRecord] = {}
    kept: dict[str, list[StageRecord]] = {}
    for stage in record.stages:
        out, into = stage.tags.get("adaptflow.checkpoint.digest"), stage.tags.get("adaptflow.input_checkpoint.digest")
        if out is None:
            continue
        if out == into:
            kept.setdefault(out, []).append(stage)
        else:
            produced[out] = stage
    final = (record.version or {}).get("tags", {}).get("adaptflow.checkpoint.digest")
    if final is None:  # not registered: the last stage that produced a checkpoint
        final = next((d for s in reversed(record.stages) if (d := s.tags.get("adaptflow.checkpoint.digest"))), None)
    links, digest = [], final
    while digest is not None:
        for stage in reversed(kept.pop(digest, [])):
            links.append(_link("kept", stage, digest, note=stage.tags.get("adaptflow.guard.reason", "")))
        stage = produced.pop(digest, None)
        if stage is None:
            break
        links.append(_link("stage", stage, digest))
        digest = stage.tags.get("adaptflow.input_checkpoint.digest")
    links.append({"kind": "base", "name": "base model", "digest": digest or record.tags.get("adaptflow.base_model.digest"),
                  "uri": record.tags.get("adaptflow.base_model.uri", ""), "datasets": []})
    links.reverse()
    if record.version:
        links.append({"kind": "registered", "name": f"{record.version['name']} v{record.version['version']}",
                      "digest": final, "uri": record.version["source"], "aliases": record.version["aliases"],
                      "datasets": []})
    return links


def _link(kind: str, stage: StageRecord, digest: str, note: str = "") -> dict:
    return {"kind": kind, "name": stage.name, "digest": digest, "run_id": stage.run_id, "note": note,
            "uri": stage.tags.get("adaptflow.checkpoint.uri", ""), "datasets": [d["name"] for d in stage.datasets]}


def _datasets(record: BuildRecord) -> list[dict]:
    """Every dataset input of the build, once per (name, digest), with the stages that read it."""
    seen: dict[tuple[str, str], dict] = {}
    for stage in record.stages:
        for d in stage.datasets:
            row = seen.setdefault((d["name"], d["digest"]), d | {"stages": []})
            if stage.name not in row["stages"]:
                row["stages"].append(stage.name)
    return list(seen.values())


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
