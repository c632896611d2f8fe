"""Evaluation: knowledge preservation (the base model's and the build's language model's (pseudo-)perplexity on
held-out text of each evaluation corpus), and, for every fine-tuned seed, the task's test set, labelled
out-of-distribution sets and robustness to noise; then the promotion gates.

    evaluate.run(Config(...), Inputs(base=..., language_model=..., corpora={...}, finetuned=(...), ...), env)
        -> EvalReport
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field, model_validator

from adaptflow import kinds
from adaptflow.config.base import CorpusName, PositiveInt, Reference, Section
from adaptflow.data.blocks import Packing
from adaptflow.data.labelled import TaskSplits
from adaptflow.errors import DataError
from adaptflow.evaluation.gates import GatesConfig, check_gates
from adaptflow.evaluation.perplexity import compare_perplexity
from adaptflow.evaluation.scoring import aggregate
from adaptflow.evaluation.suite import RobustnessConfig, task_suite
from adaptflow.lineage import stage_cache_key
from adaptflow.models.checkpoints import infer_objective
from adaptflow.refs import CheckpointRef, DatasetRef, EvalReport, Record
from adaptflow.stages import finetune
from adaptflow.stages.contract import StageEnv

NAME = "evaluate"
SECTION = "evaluation"  # its recipe section (top level, not under stages:)
DISTRIBUTED = False
REUSABLE = False  # the champion it compares against may have moved since
Result = EvalReport


class Config(Section):
    """Knowledge preservation: (pseudo-)perplexity of the base model and the build's language model on the
    validation split of each named corpus (masked LMs: pseudo-perplexity over `pseudo_perplexity_tokens`
    tokens, one forward pass each; causal LMs: perplexity over `max_blocks` blocks)."""

    enabled: bool = True
    corpora: list[CorpusName] = Field(default_factory=lambda: ["domain"])
    block_size: Annotated[int, Field(ge=8)] = 128
    max_blocks: PositiveInt = 64
    pseudo_perplexity_tokens: PositiveInt = 1024
    batch_size: PositiveInt = 16
    # The fine-tuned model (every seed): its task's test set, labelled out-of-distribution sets (tasks of the
    # same type and labels; their test split, else all of their data), and robustness to noise.
    ood_tasks: list[Annotated[str, Reference("tasks", like_fine_tuned=True)]] = Field(default_factory=list)
    robustness: RobustnessConfig | None = RobustnessConfig()
    gates: GatesConfig = GatesConfig()

    @model_validator(mode="after")
    def _gates_are_measured(self) -> Config:
        gates = self.gates
        if gates.max_general_perplexity_rise_pct is not None and gates.general_corpus not in self.corpora:
            raise ValueError(f"gates.max_general_perplexity_rise_pct reads corpus {gates.general_corpus!r}, which "
                             f"is not evaluated: add it to evaluation.corpora or set gates.general_corpus")
        if gates.max_robustness_drop is not None and self.robustness is None:
            raise ValueError("gates.max_robustness_drop needs evaluation.robustness (it is null)")
        return self


@dataclass(frozen=True)
class Inputs(Record):
    base: CheckpointRef  # the build's starting model: the "before" of knowledge preservation
    language_model: CheckpointRef  # the build's language model (pretraining's output, else the base): "after"
    corpora: dict[str, DatasetRef] = field(default_factory=dict, metadata={"context": "eval"})  # held-out text
    lm_objective: str | None = None  # mlm | clm; default: inferred from the base model
    isolate_documents: bool | None = None  # pretraining's packing setting (null: the objective's default)
    task_name: str | None = None  # the fine-tuned task
    task: TaskSplits | None = None
    finetuned: tuple[finetune.Result, ...] = ()  # every seed's model, test-scored by the fine-tuning stage
    finetune: finetune.Config | None = None  # how records were encoded for it
    ood: dict[str, TaskSplits] = field(default_factory=dict)
    champion: CheckpointRef | None = None  # the registry's champion, scored on this build's test set
    champion_version: str | None = None


def check_recipe(recipe) -> None:
    """Gates and OOD sets that score the fine-tuned model need the fine-tuning stage (else they could only
    fail, after the whole build)."""
    if recipe.enabled("finetune") is not None:
        return
    gates = recipe.evaluation.gates
    needs = [f"evaluation.gates.{name}" for name in ("min_task_metric", "max_robustness_drop",
                                                     "min_gain_over_champion") if getattr(gates, name) is not None]
    needs += ["evaluation.ood_tasks"] if recipe.evaluation.ood_tasks else []
    if needs:
        raise ValueError(f"{', '.join(needs)} score the fine-tuned model, but stages.finetune is disabled: "
                         "enable it, or remove them")


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, seed)


def run(config: Config, inputs: Inputs, env: StageEnv) -> EvalReport:
    objective = inputs.lm_objective or infer_objective(inputs.base.uri)
    metrics = compare_perplexity(
        inputs.base, inputs.language_model, inputs.corpora, objective=objective, block_size=config.block_size,
        max_blocks=config.max_blocks, batch_size=config.batch_size, pseudo_tokens=config.pseudo_perplexity_tokens,
        store=env.token_store, packing=Packing(isolate_documents=inputs.isolate_documents), seed=env.seed,
    ) if inputs.corpora else {}
    notes: dict[str, str] = {}
    task = inputs.task
    metric = config.gates.metric or (kinds.get(task.kind).primary_metric if task is not None else None)
    if inputs.finetuned and task is not None:
        if task.test is None:
            notes["adaptflow.evaluate.note"] = f"task {inputs.task_name!r} has no test split: no task metrics"
        else:
            metrics |= _task_metrics(config, inputs, env)
            if config.gates.min_gain_over_champion is not None and inputs.champion is not None:
                metrics |= _against_champion(inputs, metric, metrics, notes, env)
    gates = check_gates(config.gates, metrics, metric=metric)
    passed = all(g.passed for g in gates)
    for g in gates:
        metrics |= {f"gate.{g.name}.threshold": g.threshold, f"gate.{g.name}.passed": float(g.passed)}
        if g.value is not None:
            metrics[f"gate.{g.name}.value"] = g.value
    return EvalReport(metrics=metrics, passed=passed, gates=tuple(g.to_dict() for g in gates), notes=notes)


def _suite(inputs: Inputs, checkpoint: CheckpointRef, env: StageEnv, **options) -> dict[str, float]:
    task = inputs.task
    return task_suite(checkpoint, kind=task.kind, labels=list(task.labels), test=task.test,
                      max_length=inputs.finetune.max_length, prompt_template=inputs.finetune.prompt_template,
                      trust_remote_code=env.trust_remote_code, **options)


def _task_metrics(config: Config, inputs: Inputs, env: StageEnv) -> dict[str, float]:
    """Every seed's checkpoint on the test set, the OOD sets and the noisy test sample; `seed<k>/<metric>`
    per seed, `eval.<metric>_mean` / `_std` over seeds."""
    ood = {name: [other.test] if other.test is not None else [r for r in (other.train, other.validation) if r]
           for name, other in inputs.ood.items()}
    per_seed = {  # the fine-tuning stage scored each seed on the test set already
        result.seed: {k: v for k, v in result.metrics.items() if k.startswith("test_")} | _suite(
            inputs, result.checkpoint, env, ood=ood, robustness=config.robustness, seed=env.seed, score_test=False)
        for result in inputs.finetuned
    }
    metrics = {f"seed{seed}/{name}": value for seed, scores in per_seed.items() for name, value in scores.items()}
    return metrics | {f"eval.{name}": value for name, value in aggregate(per_seed).items()}


def _against_champion(inputs: Inputs, metric: str, metrics: dict, notes: dict, env: StageEnv) -> dict:
    """The registry's champion scored on this build's test set: `champion_test_<metric>`, `champion_gain`
    (this build's mean minus the champion's) and `champion_version`."""
    version = float(inputs.champion_version)
    try:
        scores = _suite(inputs, inputs.champion, env)
    except DataError as err:  # another label set: not comparable, so the gate cannot pass
        notes["adaptflow.champion.note"] = str(err)[:5000]
        return {"champion_version": version}
    ours = metrics.get(f"eval.test_{metric}_mean")
    champion_score = scores[f"test_{metric}"]
    out = {"champion_version": version, f"champion_test_{metric}": champion_score}
    if ours is not None:
        out["champion_gain"] = ours - champion_score
    return out
