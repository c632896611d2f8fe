"""Registration as a Prefect task: the build's final model becomes a new registry version, alias `challenger`."""

from __future__ import annotations

from adaptflow.models.checkpoints import infer_objective
from adaptflow.refs import CheckpointRef, EvalReport
from adaptflow.stages import adapt
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.retries import stage_task
from adaptflow.tracking.registry import ANY, PromotionRefused, promote, register_build, version_tags


@stage_task("register")
def register(ctx: BuildContext, model: CheckpointRef, kind: str | None, report: EvalReport | None,
             adaptation: adapt.Result | None = None) -> str:
    """Register `model` on the build run; return its version. `kind` is the fine-tuned task's; without one the
    model is the adaptation's classifier, or (no adaptation) the language model. The version's gates are the
    evaluation's and, when the adaptation's classifier is what is registered, the adaptation guard's; `champion`
    moves only on a verdict of "passed"."""
    if kind is None and model.stage == adapt.NAME:  # a classifier of the adaptation's source task
        kind = ctx.recipe.tasks[ctx.recipe.stages.adapt.source_task].type
    kind = kind or infer_objective(model.uri)
    gates = list(report.gates) if report is not None else []
    if adaptation is not None and adaptation.reference is not None and model == adaptation.checkpoint:
        gates.append(adapt.guard_gate(adaptation))  # the adapt stage's output is the build's product
    passed = all(gate["passed"] for gate in gates)
    client = ctx.tracking.client()
    version = register_build(
        client, run_id=ctx.build_run_id, checkpoint=model, kind=kind,
        model_name=ctx.recipe.registered_model_name,
        tags=version_tags(model, build_run_id=ctx.build_run_id, gates=gates, passed=passed),
    )
    name = ctx.recipe.registered_model_name
    client.set_tag(ctx.build_run_id, "adaptflow.registered_model", f"{name}/{version}")
    if ctx.recipe.registry.auto_promote:
        try:
            decision = promote(client, name, version=version, reason="auto-promotion (gates passed)", user="adaptflow",
                               expected_champion=compared_champion(report))
        except PromotionRefused as refused:  # recorded in the audit trail; the build itself succeeded
            decision = {"action": "refused", "reason": str(refused)}
        client.set_tag(ctx.build_run_id, "adaptflow.promotion", f"{decision['action']}: {decision['reason']}")
    return version


def compared_champion(report: EvalReport | None) -> str | None:
    """The champion version the build's gates were judged against (None: there was none), or ANY when no gate
    compared against a champion."""
    gates = {gate["name"] for gate in report.gates} if report is not None else set()
    if "min_gain_over_champion" not in gates:
        return ANY
    version = report.metrics.get("champion_version")
    return None if version is None else str(int(version))
