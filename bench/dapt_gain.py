"""Does continued domain pretraining pay off? No-adaptation baseline vs DAPT → fine-tuning, over seeds.

    python bench/dapt_gain.py                       # ChemProt (biomedical) and CLAUDETTE (legal), 3 seeds: ~1 h
    python bench/dapt_gain.py --max-steps 20 --max-examples 300 --seeds 1   # a quick trial

Both arms run each recipe's own fine-tuning settings and budget on the real MiniLM; the DAPT arm starts
from the recipe's pretraining stage, the baseline from the packaged MiniLM. Prints test macro-/micro-F1
(mean ± std over seeds) and the gain, writes bench/dapt_gain.json, and ends with a key=value line.
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
from adaptflow.models import materialize_base_model
from adaptflow.recipe import load_recipe
from adaptflow.stages import StageEnv, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {"biomedical": "chemprot", "legal": "claudette"}


def run_domain(domain: str, seeds: list[int], workdir: Path, max_steps: int | None, max_examples: int | None):
    recipe = load_recipe(ROOT / "domains" / f"{domain}.yaml").capped(max_steps=max_steps, max_examples=max_examples)
    settings, tuning = recipe.stages.pretrain, recipe.stages.finetune
    data_dir = workdir / "datasets"
    corpora = {
        name: prepare_corpus(c.path, name=name, out_dir=data_dir, format=c.format, text_field=c.text_field,
                             validation_fraction=c.validation_fraction, seed=recipe.seed,
                             max_documents=c.max_documents)
        for name, c in recipe.corpora.items()
    }
    task = prepare_task(tuning.task, recipe.tasks[tuning.task], out_dir=data_dir, seed=recipe.seed)
    base = materialize_base_model(recipe.model, out_dir=workdir / "models", tokenizer_texts=None, seed=recipe.seed)

    started = time.perf_counter()
    domain_corpus = corpora[settings.corpus]
    replay = corpora[settings.replay.corpus].train if settings.replay else None
    dapt = pretrain.run(settings, pretrain.Inputs(base=base, train=domain_corpus.train,
                                                  validation=domain_corpus.validation, replay=replay),
                        StageEnv(work_dir=workdir / "stages", cache_dir=workdir / "cache", seed=recipe.seed)).checkpoint
    pretrain_seconds = time.perf_counter() - started

    runs = []
    for arm, start in (("baseline", base), ("dapt", dapt)):
        for seed in seeds:
            t0 = time.perf_counter()
            result = finetune.run(tuning, finetune.Inputs(base=start, task=task),
                                  StageEnv(work_dir=workdir / "stages", seed=seed))
            runs.append({"arm": arm, "seed": seed, "seconds": time.perf_counter() - t0,
                         **{k: v for k, v in result.metrics.items() if k.startswith(("test_", "val_"))},
                         "steps": result.metrics["steps"]})
            print(f"  {domain:<10} {arm:<8} seed {seed}: test macro-F1 {result.metrics['test_macro_f1']:.4f} "
                  f"micro-F1 {result.metrics['test_micro_f1']:.4f} ({runs[-1]['seconds']:.0f} s)", flush=True)
    return {
        "task": tuning.task,
        "train_examples": task.train.rows,
        "test_examples": task.test.rows,
        "pretrain_steps": settings.max_steps,
        "finetune_max_steps": tuning.max_steps,
        "pretrain_seconds": pretrain_seconds,
        "runs": runs,
    }


def summarize(runs: list[dict], arm: str, metric: str) -> tuple[float, float]:
    values = [r[metric] for r in runs if r["arm"] == arm]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--max-steps", type=int, help="cap every stage's steps (quick trials only)")
    parser.add_argument("--max-examples", type=int, help="cap every dataset (quick trials only)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "dapt_gain.json")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dapt-gain-"))
    if args.max_steps or args.max_examples:
        print(f"quick trial: steps capped at {args.max_steps}, datasets at {args.max_examples} examples")
    results = {}
    for domain in args.domains:
        print(f"{domain}: pretraining once, then fine-tuning baseline and DAPT × seeds {args.seeds}", flush=True)
        results[domain] = run_domain(domain, args.seeds, workdir, args.max_steps, args.max_examples)
        # Written after every domain, so an interrupted run keeps what it finished.
        args.out.write_text(json.dumps({"seeds": args.seeds, "results": results, "complete": False}, indent=2))

    print()
    print(f"{'task':<10} {'arm':<9} {'test macro-F1':>17} {'test micro-F1':>17}   (mean ± std over "
          f"{len(args.seeds)} seeds)")
    headline = {}
    for result in results.values():
        for arm in ("baseline", "dapt"):
            macro, macro_sd = summarize(result["runs"], arm, "test_macro_f1")
            micro, micro_sd = summarize(result["runs"], arm, "test_micro_f1")
            print(f"{result['task']:<10} {arm:<9} {macro:>9.4f} ± {macro_sd:.4f} {micro:>9.4f} ± {micro_sd:.4f}")
        gain_macro = summarize(result["runs"], "dapt", "test_macro_f1")[0] - summarize(
            result["runs"], "baseline", "test_macro_f1")[0]
        gain_micro = summarize(result["runs"], "dapt", "test_micro_f1")[0] - summarize(
            result["runs"], "baseline", "test_micro_f1")[0]
        print(f"{result['task']:<10} {'gain':<9} {gain_macro:>+9.4f}          {gain_micro:>+9.4f}")
        headline[f"{result['task']}_macro_gain"] = round(gain_macro, 4)
        headline[f"{result['task']}_micro_gain"] = round(gain_micro, 4)
    args.out.write_text(json.dumps({"seeds": args.seeds, "results": results, "headline": headline,
                                    "complete": True}, indent=2))
    print(f"\nwritten {args.out}")
    print(" ".join(f"{k}={v}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
