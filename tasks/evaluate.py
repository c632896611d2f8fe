"""Evaluation as a Prefect task (`adaptflow.stages.evaluate`): knowledge preservation (base vs the build's
language model) and, for every fine-tuned seed, the task's test set, out-of-distribution sets and robustness to
noise; the registry's champion scored on the same test set when a gate compares against it; the gates' verdicts
on the stage run and the build run."""

from __future__ import annotations

import contextlib

from adaptflow.refs import CheckpointRef, EvalReport
from adaptflow.stages import evaluate as stage
from adaptflow.stages import finetune
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import stage_task
from adaptflow.tasks.stage_runs import COMPUTE_SECONDS, stage_run
from adaptflow.tracking.registry import champion_checkpoint


@stage_task("evaluate")
def evaluate(ctx: BuildContext, base: CheckpointRef, candidate: CheckpointRef,
             finetuned: list[finetune.Result] | None, data: PreparedInputs) -> EvalReport:
    recipe = ctx.recipe
    config = recipe.evaluation
    pretrain, tuning = recipe.enabled("pretrain"), recipe.enabled("finetune")
    objective = pretrain.objective if pretrain is not None and pretrain.objective != "auto" else None
    task = data.tasks[tuning.task] if tuning is not None else None
    compares = config.gates.min_gain_over_champion is not None and bool(finetuned) and task is not None
    tags = {"adaptflow.base.digest": base.digest, "adaptflow.candidate.uri": candidate.uri,
            "adaptflow.candidate.digest": candidate.digest}
    client = ctx.tracking.client()
    with (champion_checkpoint(client, recipe.registered_model_name) if compares
          else contextlib.nullcontext()) as champion:
        inputs = stage.Inputs(
            base=base, language_model=candidate,
            corpora={name: data.corpora[name].validation for name in config.corpora},
            lm_objective=objective, isolate_documents=pretrain.packing.isolate_documents if pretrain else None,
            task_name=tuning.task if tuning else None, task=task,
            finetuned=tuple(finetuned or ()), finetune=tuning,
            ood={name: data.tasks[name] for name in config.ood_tasks},
            champion=champion[1] if champion else None, champion_version=champion[0] if champion else None,
        )
        with stage_run(ctx, stage, config, inputs, params=config.model_dump(mode="json"), tags=tags) as run:
            report = run.result
            run.log_metrics(0, report.metrics)
            run.log_metrics(0, {k: v for k, v in report.metrics.items() if "/" not in k and k != COMPUTE_SECONDS},
                            on=ctx.build_run_id)
            run.client.log_dict(run.run_id, {"passed": report.passed, "gates": list(report.gates)}, "gates.json")
            for target in (run.run_id, ctx.build_run_id):
                run.client.set_tag(target, "adaptflow.gates", report.verdict)
            for gate in report.gates:
                run.client.set_tag(run.run_id, f"adaptflow.gate.{gate['name']}",
                                   f"{'pass' if gate['passed'] else 'FAIL'}: {gate['reason']}")
            for tag, note in report.notes.items():
                target = ctx.build_run_id if tag == "adaptflow.champion.note" else run.run_id
                run.client.set_tag(target, tag, note)
    return report
