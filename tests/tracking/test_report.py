"""The build report: lineage walked by digest, every section rendered by a real browser, untrusted text escaped.
(The report of a real tiny build, logged to its run and written by `adaptflow report`, is checked in test_flow.py.)"""

from __future__ import annotations

from adaptflow.tracking.report import BuildRecord, StageRecord, draw_plots, lineage_chain, render
from tests.browser import render_in_chromium


def _stage(name, digest_in, digest_out, *, curves=None, datasets=(), **tags):
    stage_tags = {"adaptflow.input_checkpoint.digest": digest_in, "adaptflow.checkpoint.digest": digest_out,
                  "adaptflow.checkpoint.uri": f"/runs/stages/{name}/final", **tags} if digest_out else dict(tags)
    return StageRecord(name, f"run-{name}", "FINISHED", 12.5, {"loss": 1.0}, stage_tags, curves or {},
                       [{"name": d, "digest": f"d-{d}", "context": "train", "rows": 10, "source": f"/data/{d}"}
                        for d in datasets])


def _record(*, registered=True, source="/data/corpus.jsonl") -> BuildRecord:
    falling = [(step, 3.0 - step / 10) for step in range(0, 20, 2)]
    evaluate = _stage("evaluate", None, None, **{
        "adaptflow.gate.min_task_metric": "pass: test macro_f1 (mean over seeds) 0.5100 ≥ 0.5",
        "adaptflow.gate.max_robustness_drop": "FAIL: worst macro_f1 drop under noise 0.0800 > 0.05"})
    evaluate.metrics = {"gate.min_task_metric.value": 0.51, "gate.min_task_metric.threshold": 0.5,
                        "gate.max_robustness_drop.value": 0.08, "gate.max_robustness_drop.threshold": 0.05,
                        "seed1/test_macro_f1": 0.50, "seed2/test_macro_f1": 0.52}
    stages = [
        _stage("prepare", None, None, datasets=["domain/train"]),
        _stage("pretrain", "base0", "pre1", curves={"loss": falling, "eval_loss": falling[::3]},
               datasets=["domain/train", "general/train"]),
        _stage("adapt", "pre1", "pre1", **{"adaptflow.guard": "rejected",
                                           "adaptflow.guard.reason": "DANN 0.61 ≤ source-only 0.63"}),
        _stage("finetune-seed1", "pre1", "ft1", curves={"loss": falling, "val_loss": falling[::4]},
               datasets=["chemprot/train"]),
        _stage("finetune-seed2", "pre1", "ft2", curves={"loss": falling}, datasets=["chemprot/train"]),
        evaluate,
    ]
    stages[0].datasets[0]["source"] = source
    metrics = {"eval.test_macro_f1_mean": 0.51, "eval.test_macro_f1_std": 0.01,
               "eval.robust_typos_drop_mean": 0.08, "eval.robust_typos_drop_std": 0.01,
               "eval.robust_casing_drop_mean": 0.0, "eval.robust_casing_drop_std": 0.0,
               "general_perplexity_before": 40000.0, "general_perplexity_after": 1500.0,
               "general_perplexity_change_pct": -96.25}
    summary = {"build_run_id": "build123", "domain": "biomedical", "status": "FINISHED", "metrics": metrics,
               "gates": "failed", "promotion": "refused: gate max_robustness_drop failed", "stages": {}}
    version = {"name": "adaptflow-biomedical", "version": "2", "aliases": ["challenger"], "source": "/mlartifacts/x",
               "tags": {"adaptflow.checkpoint.digest": "ft2"}} if registered else None
    return BuildRecord(summary, {"adaptflow.base_model.digest": "base0", "adaptflow.base_model.uri": "/models/base",
                                 "adaptflow.stages": "pretrain,adapt,finetune"}, 300.0, stages,
                       [{"name": "max_robustness_drop", "value": 0.08, "threshold": 0.05, "passed": False,
                         "reason": "worst macro_f1 drop under noise 0.0800 > 0.05"}], version)


def test_lineage_walks_back_from_the_registered_checkpoint_and_shows_a_kept_stage():
    chain = lineage_chain(_record())
    assert [(link["kind"], link["name"], link["digest"]) for link in chain] == [
        ("base", "base model", "base0"),
        ("stage", "pretrain", "pre1"),
        ("kept", "adapt", "pre1"),
        ("stage", "finetune-seed2", "ft2"),  # the registered seed, not seed 1
        ("registered", "adaptflow-biomedical v2", "ft2"),
    ]
    assert chain[2]["note"] == "DANN 0.61 ≤ source-only 0.63"
    assert chain[1]["datasets"] == ["domain/train", "general/train"]
    unregistered = lineage_chain(_record(registered=False))  # then from the last checkpoint produced
    assert [link["name"] for link in unregistered] == ["base model", "pretrain", "adapt", "finetune-seed2"]


def test_the_report_renders_every_section_and_plot_in_headless_chromium(tmp_path):
    record = _record(source='/data/<script>document.title="pwned"</script>.jsonl')
    plots = draw_plots(record, tmp_path / "plots")
    assert sorted(plots) == ["loss-finetune-seed1", "loss-finetune-seed2", "loss-pretrain", "perplexity",
                             "robustness"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in plots.values())
    page_path = tmp_path / "report.html"
    page_path.write_text(render(record, plots))
    (tmp_path / "plots").rename(tmp_path / "moved")  # the page must not need its plot files: they are inlined

    page = render_in_chromium(page_path, tmp_path)
    assert list(page.sections) == ["summary", "stages", "loss-curves", "evaluation", "gates", "lineage"]
    assert page.body["data-images-total"] == "5" and page.body["data-images-decoded"] == "5"
    assert page.images == ["loss-pretrain", "loss-finetune-seed1", "loss-finetune-seed2", "perplexity", "robustness"]
    summary, gates, lineage = page.sections["summary"], page.sections["gates"], page.sections["lineage"]
    assert "FINISHED" in summary and "5 min 00 s" in summary and "@challenger" in summary
    assert "refused: gate max_robustness_drop failed" in summary
    assert "max_robustness_drop 0.0800 0.0500 FAIL worst macro_f1 drop" in gates
    assert "general 40,000.0 1,500.0 -96.2%" in page.sections["evaluation"]
    assert "test_macro_f1 0.5000 0.5200" in page.sections["evaluation"]  # per seed
    assert "kept its input unchanged: DANN 0.61 ≤ source-only 0.63" in lineage
    assert "adaptflow-biomedical v2 ft2 @challenger" in lineage
    # Text from recipes and data is escaped, never run.
    assert '<script>document.title="pwned"</script>' in lineage and page.title == "adaptflow build build123 (biomedical)"
    assert "&lt;script&gt;" in page_path.read_text()
