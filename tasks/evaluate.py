"""Evaluation as a Prefect task: knowledge preservation (base vs the build's language model) and, for every
fine-tuned seed, the task's test set, out-of-distribution sets and robustness to noise."""

from __future__ import annotations

import time

from adaptflow.evaluate import aggregate, compare_perplexity, primary_metric, task_suite
from adaptflow.gates import check_gates
from adaptflow.models import infer_objective
from adaptflow.refs import CheckpointRef, EvalReport
from adaptflow.stages.finetune import FinetuneResult
from adaptflow.tracking import log_dataset, metrics_logger
from tasks import COMPUTE_SECONDS, BuildContext, stage_run, stage_task
from tasks.prepare import PreparedInputs


@stage_task("evaluate")
def evaluate(
    ctx: BuildContext, base: CheckpointRef, candidate: CheckpointRef, finetuned: list[FinetuneResult] | None,
    data: PreparedInputs,
) -> EvalReport:
    config = ctx.recipe.evaluation
    pretrain = ctx.recipe.stages.pretrain
    objective = pretrain.objective if pretrain and pretrain.objective != "auto" else infer_objective(base.uri)
    corpora = {name: data.corpora[name].validation for name in config.corpora}
    tags = {"adaptflow.base.digest": base.digest, "adaptflow.candidate.uri": candidate.uri,
            "adaptflow.candidate.digest": candidate.digest}
    with stage_run(ctx, "evaluate", params=config.model_dump(mode="json"), tags=tags) as (client, run_id):
        for name, ref in corpora.items():
            log_dataset(client, run_id, ref, context=f"eval/{name}")
        started = time.perf_counter()
        metrics = compare_perplexity(
            base, candidate, corpora, objective=objective, block_size=config.block_size,
            max_blocks=config.max_blocks, batch_size=config.batch_size, pseudo_tokens=config.pseudo_perplexity_tokens,
            cache_dir=ctx.cache_dir, seed=ctx.recipe.seed,
        ) if corpora else {}
        if finetuned:
            metrics |= _task_metrics(ctx, finetuned, data, client, run_id)
        finetune = ctx.recipe.stages.finetune
        kind = data.tasks[finetune.task].kind if finetune is not None and finetune.enabled else "classification"
        metric = config.gates.metric or primary_metric(kind)
        if config.gates.min_gain_over_champion is not None and finetuned:
            metrics |= _against_champion(ctx, data, metric, metrics, client)
        metrics[COMPUTE_SECONDS] = time.perf_counter() - started
        gates = check_gates(config.gates, metrics, metric=metric)
        passed = all(g.passed for g in gates)
        for g in gates:
            metrics |= {f"gate.{g.name}.threshold": g.threshold, f"gate.{g.name}.passed": float(g.passed)}
            if g.value is not None:
                metrics[f"gate.{g.name}.value"] = g.value
        metrics_logger(client, run_id)(0, metrics)
        metrics_logger(client, ctx.build_run_id)(0, {k: v for k, v in metrics.items()
                                                      if "/" not in k and k != COMPUTE_SECONDS})
        client.log_dict(run_id, {"passed": passed, "gates": [g.to_dict() for g in gates]}, "gates.json")
        verdict = "none" if not gates else "passed" if passed else "failed"
        for target in (run_id, ctx.build_run_id):
            client.set_tag(target, "adaptflow.gates", verdict)
        for g in gates:
            client.set_tag(run_id, f"adaptflow.gate.{g.name}", f"{'pass' if g.passed else 'FAIL'}: {g.reason}")
        return EvalReport(metrics=metrics, passed=passed, gates=tuple(g.to_dict() for g in gates))


def _task_metrics(ctx: BuildContext, finetuned: list[FinetuneResult], data: PreparedInputs, client,
                  run_id: str) -> dict[str, float]:
    """Every seed's checkpoint on the test set, the OOD sets and the noisy test sample; `seed<k>/<metric>`
    per seed, `eval.<metric>_mean` / `_std` over seeds."""
    config, finetune = ctx.recipe.evaluation, ctx.recipe.stages.finetune
    splits = data.tasks[finetune.task]
    if splits.test is None:
        client.set_tag(run_id, "adaptflow.evaluate.note", f"task {finetune.task!r} has no test split: no task metrics")
        return {}
    ood = {}
    for name in config.ood_tasks:
        other = data.tasks[name]
        ood[name] = [other.test] if other.test is not None else [r for r in (other.train, other.validation) if r]
        for ref in ood[name]:
            log_dataset(client, run_id, ref, context=f"ood/{name}")
    per_seed = {  # the fine-tuning stage scored each seed on the test set already
        result.seed: {k: v for k, v in result.metrics.items() if k.startswith("test_")} | task_suite(
            result.checkpoint, finetune, kind=splits.kind, labels=list(splits.labels), test=splits.test, ood=ood,
            robustness=config.robustness, seed=ctx.recipe.seed, score_test=False)
        for result in finetuned
    }
    metrics = {f"seed{seed}/{name}": value for seed, scores in per_seed.items() for name, value in scores.items()}
    return metrics | {f"eval.{name}": value for name, value in aggregate(per_seed).items()}


def _against_champion(ctx: BuildContext, data: PreparedInputs, metric: str, metrics: dict, client) -> dict:
    """The registry's champion scored on this build's test set: `champion_test_<metric>`, `champion_gain`
    (this build's mean minus the champion's) and `champion_version`; nothing when there is no champion."""
    from adaptflow.errors import DataError
    from adaptflow.registry import champion_checkpoint

    finetune = ctx.recipe.stages.finetune
    splits = data.tasks[finetune.task]
    with champion_checkpoint(client, ctx.recipe.registered_model_name) as champion:
        if champion is None or splits.test is None:
            return {}
        version, checkpoint = champion
        try:
            scores = task_suite(checkpoint, finetune, kind=splits.kind, labels=list(splits.labels), test=splits.test)
        except DataError as err:  # another label set: not comparable, so the gate cannot pass
            client.set_tag(ctx.build_run_id, "adaptflow.champion.note", str(err)[:5000])
            return {"champion_version": float(version)}
    ours = metrics.get(f"eval.test_{metric}_mean")
    champion_score = scores[f"test_{metric}"]
    out = {"champion_version": float(version), f"champion_test_{metric}": champion_score}
    if ours is not None:
        out["champion_gain"] = ours - champion_score
    return out
