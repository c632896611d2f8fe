"""Does adaptation pay on cross-domain sentiment? Each objective of the adapt stage against source-only, over
domain pairs and seeds, and the whole chain (TAPT → adapt → few-shot fine-tuning) against its parts.

    python bench/adaptation.py                  # the real MiniLM: 4 Amazon pairs × 3 seeds, then the chain ablation
    python bench/adaptation.py --quick          # a smoke run: 1 pair, 1 seed, a few steps
    python bench/adaptation.py --section adapt  # only the per-objective table (or --section chain)

Every number is the target test accuracy of the model a stage actually outputs. Target test examples are never
trained on nor used by the guard: each target domain's labelled reviews are split as domains/sentiment.yaml splits
kitchen's (by a hash of each review, the same split for every arm): 20 % the guard's proxy (and fine-tuning's
early stopping), ~10 % (~200 reviews) the few-shot set only the chain's fine-tuning trains on, 70 % the test set.
Settings are the recipe's (learning rates, batch 16 source + 16 target, …), with one budget for every arm (FULL
below: steps and sequence length):

    source_only    the guard's reference: the same model, seed and budget with no target-side objective
    dann           + a domain adversary behind gradient reversal
    target_mlm     + a masked LM on target text (UDALM); the packaged MiniLM has no MLM head, so it warms up alone
    self_training  + class-balanced pseudo-labels on confident target text (two rounds)
    combination    dann + self_training. (It was target_mlm + self_training until seed 1 of books → kitchen and
                   kitchen → books showed a masked LM through an untrained head costing 1–7 points there.)
    guarded        what the combination's stage outputs after its guard: the adapted or the reference classifier

The chain ablation on books → kitchen runs domains/sentiment.yaml's own adaptation (a target masked LM, whose head
TAPT trained, + self-training): no adaptation (source-only) / +TAPT (masked-LM pretraining on the target's
unlabelled text, then source-only) / +adapt / +TAPT+adapt / +TAPT+adapt+few-shot fine-tuning, and fine-tuning on
the few-shot set alone.

The JSON beside this script is written after every finished run; runs already in it are skipped, so the benchmark
continues where it stopped. It prints per-pair tables (mean ± std over seeds) and ends with a key=value line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from adaptflow.data.corpus import prepare_corpus
from adaptflow.data.labelled import prepare_task
from adaptflow.models import checkpoint_digest, materialize_base_model
from adaptflow.recipe import load_recipe
from adaptflow.refs import CheckpointRef
from adaptflow.stages import StageEnv, adapt, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["books:kitchen", "kitchen:books", "books:electronics", "electronics:kitchen"]
ADAPT_ARMS = ["source_only", "dann", "target_mlm", "self_training", "combination", "guarded"]
CHAIN_ARMS = ["no_adaptation", "tapt", "tapt_adapt", "tapt_adapt_finetune", "finetune_only", "adapt"]
CHAIN_PAIR = "books:kitchen"
FULL = {"max_steps": 150, "max_length": 96, "tapt_steps": 300, "finetune_steps": 100, "eval_examples": 400}
QUICK = {"max_steps": 6, "max_length": 48, "tapt_steps": 6, "finetune_steps": 6, "eval_examples": 60}


class Benchmark:
    """Data, base model and settings shared by every run; runs recorded in (and skipped from) the JSON."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        self.budget = QUICK if args.quick else FULL
        self.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="adaptation-bench-"))
        self.recipe = load_recipe(ROOT / "domains" / "sentiment.yaml")
        self.results = json.loads(self.out.read_text()) if self.out.is_file() else {}
        self.results.setdefault("runs", {})
        target = self.recipe.tasks["kitchen"]
        self.results["settings"] = self.budget | {
            "pairs": args.pairs, "seeds": args.seeds, "target_validation_fraction": target.validation_fraction,
            "target_test_fraction": target.test_fraction}
        self.base = materialize_base_model(self.recipe.model, out_dir=self.workdir / "models", tokenizer_texts=None,
                                           seed=self.recipe.seed)
        self.domains: dict[str, dict] = {}
        self.tapt: dict[int, object] = {}
        self.tapt_adapted: dict[int, adapt.Result] = {}

    def domain(self, name: str) -> dict:
        """A domain's labelled reviews as source task and as target, and its unlabelled text — each prepared with
        the recipe's settings for books (source), kitchen (target) and kitchen's text, the file swapped."""
        if name in self.domains:
            return self.domains[name]
        folder = Path(self.recipe.tasks["books"].train).parents[1] / f"amazon_{name}"  # the recipe's data root
        data, seed, recipe = self.workdir / "datasets", self.recipe.seed, self.recipe
        labelled = str(folder / "labelled.jsonl")
        text = recipe.corpora["kitchen"]
        self.domains[name] = {
            "source": prepare_task(f"{name}-source", recipe.tasks["books"].model_copy(update={"train": labelled}),
                                   out_dir=data, seed=seed),
            # validation: the guard's proxy and early stopping; train: the few-shot set; test: the rest
            "target": prepare_task(f"{name}-target", recipe.tasks["kitchen"].model_copy(update={"train": labelled}),
                                   out_dir=data, seed=seed),
            "corpus": prepare_corpus(folder / "unlabelled_extra_hatn.jsonl", name=f"{name}-text", out_dir=data,
                                     text_field=text.text_field, validation_fraction=text.validation_fraction,
                                     seed=seed),
        }
        return self.domains[name]

    def adapt_config(self, **objectives) -> adapt.Config:
        budget = self.budget
        settings = self.recipe.stages.adapt.source_only().model_dump() | {
            "max_steps": budget["max_steps"], "max_length": budget["max_length"], "eval_every": 0,
            "max_eval_examples": budget["eval_examples"], "adversary": "none", "lambda_max": 0.1,
        }
        mlm = objectives.get("target_mlm")
        if mlm is not None:  # a --quick budget shorter than the warm-up: capped as `adaptflow build --max-steps` caps
            objectives |= {"target_mlm": mlm.model_copy(update={
                "head_warmup_steps": min(mlm.head_warmup_steps, budget["max_steps"] // 2)})}
        return adapt.Config.model_validate(settings | objectives)

    ARM_OBJECTIVES = {
        "dann": {"adversary": "dann"},
        "target_mlm": {"target_mlm": adapt.TargetMLMConfig(weight=0.5, head_warmup_steps=50)},
        "self_training": {"self_training": adapt.SelfTrainingConfig(rounds=[0.3, 0.6], threshold=0.9,
                                                                    per_class=0.5)},
    }

    def combination(self) -> dict:
        return self.ARM_OBJECTIVES["dann"] | self.ARM_OBJECTIVES["self_training"]

    def recipe_objectives(self) -> dict:
        """The target-side objectives domains/sentiment.yaml adapts with (the chain's)."""
        recipe = self.recipe.stages.adapt
        fields = ("adversary", "lambda_max", "moment_matching", "target_mlm", "self_training", "reweight_source")
        return {name: getattr(recipe, name) for name in fields}

    def run_adapt(self, pair: str, seed: int, objectives: dict, *, guard: bool, base=None) -> adapt.Result:
        source, target = pair.split(":")
        config = self.adapt_config(**objectives)
        config = config.model_copy(update={"guard": adapt.GuardConfig(enabled=guard)})
        inputs = adapt.Inputs(base=base or self.base, source=self.domain(source)["source"],
                              target=self.domain(target)["corpus"].train,
                              target_heldout=self.domain(target)["corpus"].validation,
                              target_labelled=self.domain(target)["target"])
        return adapt.run(config, inputs, StageEnv(work_dir=self.workdir / "stages", seed=seed))

    def record(self, key: str, value: dict) -> None:
        self.results["runs"][key] = value
        self.out.write_text(json.dumps(self.results, indent=2))

    def done(self, key: str) -> bool:
        return key in self.results["runs"]

    # -- the per-objective table -------------------------------------------------------------------------------

    def adapt_section(self, seed: int) -> None:
        for pair in self.args.pairs:
            for arm in ("dann", "target_mlm", "self_training"):
                key = f"adapt/{pair}/{arm}/{seed}"
                if not self.done(key):
                    started = time.perf_counter()
                    result = self.run_adapt(pair, seed, self.ARM_OBJECTIVES[arm], guard=False)
                    self.record(key, {"accuracy": result.metrics["target_test_accuracy"],
                                      "proxy_accuracy": result.metrics.get("target_accuracy"),
                                      "seconds": time.perf_counter() - started})
                    self.say(key)
            key = f"adapt/{pair}/combination/{seed}"
            if not self.done(key):  # one stage: the combination, its source-only reference and its output
                started = time.perf_counter()
                result = self.run_adapt(pair, seed, self.combination(), guard=True)
                m, seconds = result.metrics, time.perf_counter() - started
                self.record(f"adapt/{pair}/source_only/{seed}", {"accuracy": m["reference_target_test_accuracy"],
                                                                 "proxy_accuracy": m.get("reference_target_accuracy"),
                                                                 "seconds": seconds / 2})
                self.record(f"adapt/{pair}/guarded/{seed}", {
                    "accuracy": output_accuracy(result), "accepted": result.accepted, "reason": result.reason,
                    "seconds": seconds})
                self.record(key, {"accuracy": m["target_test_accuracy"], "seconds": seconds / 2,
                                  "proxy_accuracy": m.get("target_accuracy"),
                                  "reference_proxy_accuracy": m.get("reference_target_accuracy")})
                self.say(key)

    # -- the chain ablation ------------------------------------------------------------------------------------

    def tapt_checkpoint(self, seed: int):
        """Masked-LM pretraining on the chain pair's unlabelled target text (the recipe's pretraining settings)."""
        if seed not in self.tapt:
            target = self.domain(CHAIN_PAIR.split(":")[1])["corpus"]
            config = self.recipe.stages.pretrain.model_copy(update={"enabled": True,
                                                                    "max_steps": self.budget["tapt_steps"],
                                                                    "head_warmup_steps": min(40, self.budget[
                                                                        "tapt_steps"] // 2), "eval_every": 0})
            inputs = pretrain.Inputs(base=self.base, train=target.train, validation=target.validation)
            env = StageEnv(work_dir=self.workdir / "stages", cache_dir=self.workdir / "cache", seed=seed)
            final = env.stage_dir(pretrain.NAME, pretrain.cache_key(config, inputs, seed)) / "final"
            if final.is_dir():  # a resumed benchmark reuses what an earlier start pretrained, as a build would
                self.tapt[seed] = CheckpointRef(uri=str(final), digest=checkpoint_digest(final), stage=pretrain.NAME)
            else:
                self.tapt[seed] = pretrain.run(config, inputs, env).checkpoint
        return self.tapt[seed]

    def few_shot(self, base, seed: int) -> float:
        data = self.domain(CHAIN_PAIR.split(":")[1])["target"]
        # The recipe's fine-tuning settings (the adapted classifier's head kept, early stopping on the proxy).
        config = self.recipe.stages.finetune.model_copy(update={
            "task": "few_shot", "max_steps": self.budget["finetune_steps"], "max_length": self.budget["max_length"],
            "eval_every": self.budget["finetune_steps"] // 4, "seeds": [seed]})
        result = finetune.run(config, finetune.Inputs(base=base, task=data),
                              StageEnv(work_dir=self.workdir / "stages", seed=seed))
        return result.metrics["test_accuracy"]

    def chain_section(self, seed: int) -> None:
        """Each link of the chain on the chain pair; a run stands in for another where they are the same stage
        call (no adaptation = the adapt section's source-only reference, +TAPT = the source-only reference of
        +TAPT+adapt)."""
        for arm in CHAIN_ARMS:
            key = f"chain/{CHAIN_PAIR}/{arm}/{seed}"
            if not self.done(key):
                started = time.perf_counter()
                self.record(key, {"accuracy": self.chain_link(arm, seed), "seconds": time.perf_counter() - started})
                self.say(key)

    def chain_link(self, arm: str, seed: int) -> float:
        if arm == "no_adaptation":
            return self.same_as(f"adapt/{CHAIN_PAIR}/source_only/{seed}") or output_accuracy(
                self.run_adapt(CHAIN_PAIR, seed, {}, guard=False))
        if arm == "tapt":  # source-only from the TAPT checkpoint: the guard's reference of +TAPT+adapt
            return self.tapt_adapt(seed).metrics["reference_target_test_accuracy"]
        if arm == "adapt":
            return output_accuracy(self.run_adapt(CHAIN_PAIR, seed, self.recipe_objectives(), guard=True))
        if arm == "tapt_adapt":
            return output_accuracy(self.tapt_adapt(seed))
        if arm == "tapt_adapt_finetune":
            return self.few_shot(self.tapt_adapt(seed).checkpoint, seed)
        return self.few_shot(self.base, seed)  # finetune_only

    def same_as(self, key: str) -> float | None:
        return self.results["runs"][key]["accuracy"] if self.done(key) else None

    def tapt_adapt(self, seed: int) -> adapt.Result:
        if seed not in self.tapt_adapted:
            self.tapt_adapted[seed] = self.run_adapt(CHAIN_PAIR, seed, self.recipe_objectives(), guard=True,
                                                     base=self.tapt_checkpoint(seed))
        return self.tapt_adapted[seed]

    # -- reporting ---------------------------------------------------------------------------------------------

    def say(self, key: str) -> None:
        run = self.results["runs"][key]
        print(f"  {key:<48} target test accuracy {run['accuracy']:.4f} ({run['seconds']:.0f} s)", flush=True)

    def table(self, section: str, rows: list[str], arms: list[str]) -> dict:
        table = {}
        for row in rows:
            table[row] = {}
            for arm in arms:
                values = [self.results["runs"][k]["accuracy"] for s in self.args.seeds
                          if (k := f"{section}/{row}/{arm}/{s}") in self.results["runs"]]
                if values:
                    table[row][arm] = {"mean": statistics.fmean(values), "runs": len(values),
                                       "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        print(f"\n{section}: target test accuracy, mean ± std over seeds")
        print(f"{'':<22}" + "".join(f"{arm:>20}" for arm in arms))
        for row, cells in table.items():
            print(f"{row:<22}" + "".join(f"{c['mean']:>12.4f} ± {c['std']:.3f}" if (c := cells.get(arm)) else
                                         f"{'—':>20}" for arm in arms))
        return table


def output_accuracy(result: adapt.Result) -> float:
    """Target test accuracy of the classifier the stage hands on (the adapted one, or the guard's reference)."""
    metrics = result.metrics
    return metrics["target_test_accuracy" if result.output == "adapted" else "reference_target_test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=PAIRS, help="source:target domain pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--section", choices=["adapt", "chain", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="1 pair, 1 seed, a few steps (a smoke run)")
    parser.add_argument("--workdir", type=Path, help="where data and checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "adaptation.json")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.seeds = args.pairs[:1], args.seeds[:1]
        if args.out == ROOT / "bench" / "adaptation.json":
            args.out = Path(tempfile.mkdtemp(prefix="adaptation-quick-")) / "adaptation.json"

    bench = Benchmark(args)
    print(f"adapt budget: {bench.budget['max_steps']} steps, ≤ {bench.budget['max_length']} tokens, batch 16 + 16; "
          f"pairs {args.pairs}; seeds {args.seeds}; results in {args.out}", flush=True)
    for seed in args.seeds:  # seed-major: a partial run already covers every pair and the chain
        if args.section in ("adapt", "all"):
            bench.adapt_section(seed)
        if args.section in ("chain", "all"):
            bench.chain_section(seed)
    adapt_table = bench.table("adapt", args.pairs, ADAPT_ARMS)
    chain_table = bench.table("chain", [CHAIN_PAIR], CHAIN_ARMS)

    def average(arm: str) -> float | None:
        cells = [row[arm]["mean"] for row in adapt_table.values() if arm in row]
        return statistics.fmean(cells) if len(cells) == len(adapt_table) and cells else None

    headline = {arm: average(arm) for arm in ADAPT_ARMS}
    chain = chain_table.get(CHAIN_PAIR, {})
    out = {
        "adapt_minus_source_only": (headline["combination"] - headline["source_only"])
        if headline["combination"] is not None and headline["source_only"] is not None else None,
        "guarded_minus_source_only": (headline["guarded"] - headline["source_only"])
        if headline["guarded"] is not None and headline["source_only"] is not None else None,
        "worst_pair_guarded_minus_source_only": min(
            (row["guarded"]["mean"] - row["source_only"]["mean"] for row in adapt_table.values()
             if "guarded" in row and "source_only" in row), default=None),
        "chain_minus_finetune_only": chain["tapt_adapt_finetune"]["mean"] - chain["finetune_only"]["mean"]
        if {"tapt_adapt_finetune", "finetune_only"} <= chain.keys() else None,
        "chain_minus_source_only": chain["tapt_adapt_finetune"]["mean"] - chain["no_adaptation"]["mean"]
        if {"tapt_adapt_finetune", "no_adaptation"} <= chain.keys() else None,
    }
    bench.results |= {"adapt_table": adapt_table, "chain_table": chain_table, "headline": headline, "summary": out,
                      "complete": all(v is not None for v in out.values())}
    args.out.write_text(json.dumps(bench.results, indent=2))
    print(" ".join(f"{k}={v:+.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
