"""Promotion gates: declared thresholds a build's evaluation must meet before its model may become champion.

    check_gates(config, metrics, kind) -> [Gate(name, value, threshold, passed, reason), ...]

A gate whose number was not measured (no test split, no general-text corpus evaluated, …) fails, with the
reason: a gate that cannot be checked must not let a build through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adaptflow.config.base import Section
from adaptflow.refs import Record


class GatesConfig(Section):
    """Thresholds a build must meet to be promoted; unset gates are not checked. `metric` defaults to the
    task's primary metric (macro-F1 for classification, entity F1 for NER)."""

    metric: str | None = None
    min_task_metric: float | None = None  # test-set metric, mean over seeds, at least this
    max_general_perplexity_rise_pct: float | None = None  # general-text (pseudo-)perplexity rise, at most this
    general_corpus: str = "general"  # which evaluation corpus is "general text"
    max_robustness_drop: float | None = None  # worst metric drop under the robustness perturbations
    # The registry's current champion is scored on this build's test set; the build must beat it by this much
    # (the first build, with no champion yet, passes).
    min_gain_over_champion: float | None = None


@dataclass(frozen=True)
class Gate(Record):
    name: str
    value: float | None
    threshold: float
    passed: bool
    reason: str


def check_gates(config: GatesConfig, metrics: dict[str, float], *, metric: str) -> list[Gate]:
    """Every configured gate against the build's metrics (`eval.*` over seeds, `<corpus>_perplexity_*`)."""
    gates = []

    def gate(name: str, key: str, threshold: float | None, *, at_least: bool, what: str) -> None:
        if threshold is None:
            return
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            gates.append(Gate(name, None, threshold, False, f"{what} was not measured ({key} missing)"))
            return
        passed = value >= threshold if at_least else value <= threshold
        relation = ("≥" if passed else "<") if at_least else ("≤" if passed else ">")
        gates.append(Gate(name, value, threshold, passed, f"{what} {value:.4f} {relation} {threshold:g}"))

    gate("min_task_metric", f"eval.test_{metric}_mean", config.min_task_metric, at_least=True,
         what=f"test {metric} (mean over seeds)")
    gate("max_general_perplexity_rise_pct", f"{config.general_corpus}_perplexity_change_pct",
         config.max_general_perplexity_rise_pct, at_least=False,
         what=f"{config.general_corpus}-text perplexity change %")
    gate("max_robustness_drop", "eval.robustness_drop_max_mean", config.max_robustness_drop, at_least=False,
         what=f"worst {metric} drop under noise")
    if config.min_gain_over_champion is not None and "champion_version" not in metrics:
        gates.append(Gate("min_gain_over_champion", None, config.min_gain_over_champion, True,
                          "no champion yet: nothing to beat"))
    else:
        gate("min_gain_over_champion", "champion_gain", config.min_gain_over_champion, at_least=True,
             what=f"test {metric} gain over champion v{int(metrics.get('champion_version', 0))}")
    return gates
