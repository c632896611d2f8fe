"""Does active learning beat random selection at equal labelling budgets? ChemProt on the real MiniLM, over seeds.

    python bench/active_learning.py            # random vs entropy, 200 → 400 → 800 labels, 3 seeds: ~30 min
    python bench/active_learning.py --strategies random entropy margin kcenter   # every strategy: ~1 h
    python bench/active_learning.py --quick    # 1 seed, random vs entropy, 32 → 64 → 96 labels: a few minutes

Each (strategy, seed) is one run of the `active_learning` stage over a pool of ChemProt training examples: round 0
fine-tunes on the same random cold start for every strategy (same seed, same draw — it is trained once and
shared), then each round fine-tunes the packaged MiniLM afresh on everything selected so far and picks the next
batch with that model. Every round trains a fixed number of steps with domains/biomedical.yaml's fine-tuning
settings (lr, head lr, batch, max length) and is scored on fixed validation and test subsets; so at a given
budget the strategies differ only in which examples they labelled. Random selection is the baseline, measured
in the same run.

Prints test macro-/micro-F1 (mean ± std over seeds) per budget and strategy and the ratio to random, writes
bench/active_learning.json and bench/active_learning.png (learning curves), and ends with a key=value line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from adaptflow.data.corpus import stable_sample
from adaptflow.data.labelled import TaskSplits, _canonical, load_records, prepare_task
from adaptflow.models import materialize_base_model
from adaptflow.recipe import load_recipe
from adaptflow.stages import StageEnv, active_learning, finetune
from adaptflow.stages.active_learning import write_subset

ROOT = Path(__file__).resolve().parents[1]
TASK = "chemprot"
# Sized for about 30 minutes on 2 shared cores (a MiniLM step ≈ 1 s, scoring ≈ 64 examples/s); margin adds ~40%.
FULL = {"seeds": [1, 2, 3], "strategies": ["random", "entropy"], "initial": 200, "budget": 800, "rounds": 2,
        "growth": "geometric", "pool_size": 2000, "val_size": 300, "test_size": 1000, "steps": 80}
QUICK = {"seeds": [1], "strategies": ["random", "entropy"], "initial": 32, "budget": 96, "rounds": 2,
         "growth": "linear", "pool_size": 400, "val_size": 100, "test_size": 200, "steps": 16}


def shrink(task: TaskSplits, pool_size: int, val_size: int, test_size: int, seed: int, out_dir: Path) -> TaskSplits:
    """The task with its train split cut to the pool, validation and test to fixed subsets (hash-sampled)."""

    def subset(ref, size, split):
        records = load_records(ref)
        keep = stable_sample([_canonical(r) for r in records], size, seed)
        return write_subset([records[i] for i in keep], name=f"{TASK}-bench", split=split, out_dir=out_dir)

    return TaskSplits(kind=task.kind, labels=task.labels, train=subset(task.train, pool_size, "train"),
                      validation=subset(task.validation, val_size, "validation"),
                      test=subset(task.test, test_size, "test"))


def shared_finetune(timings: list[float]):
    """The fine-tuning stage, computed once per cache key: every strategy's round 0 (same seed, same draw) is one
    run."""
    done = {}

    def finetune_round(config, inputs, env):
        key = finetune.cache_key(config, inputs, env.seed)
        if key not in done:
            started = time.perf_counter()
            done[key] = finetune.run(config, inputs, env)
            timings.append(time.perf_counter() - started)
        return done[key]

    return finetune_round


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(runs: list[dict], strategies: list[str], path: Path, log_x: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric, title in zip(axes, ("test_macro_f1", "test_micro_f1"), ("test macro-F1", "test micro-F1"),
                                 strict=True):
        for strategy in strategies:
            points = curve_table(runs, strategy, metric)
            sizes = sorted(points)
            means = [summarize(points[n])[0] for n in sizes]
            stds = [summarize(points[n])[1] for n in sizes]
            ax.plot(sizes, means, marker="o", label=strategy)
            ax.fill_between(sizes, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("labelled examples")
        if log_x:
            ax.set_xscale("log", base=2)
        budgets = sorted({p["labelled"] for run in runs for p in run["curve"]})
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend()
    seeds = len({r["seed"] for r in runs})
    fig.suptitle(f"Active learning on ChemProt, MiniLM (mean ± std over {seeds} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_table(runs: list[dict], strategy: str, metric: str) -> dict[int, list[float]]:
    """labelled size -> the metric of every seed's model at that size."""
    table: dict[int, list[float]] = {}
    for run in runs:
        if run["strategy"] == strategy:
            for point in run["curve"]:
                table.setdefault(point["labelled"], []).append(point["metrics"][metric])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--strategies", nargs="+", choices=["random", "entropy", "margin", "kcenter"])
    parser.add_argument("--initial", type=int, help="random cold-start examples (round 0)")
    parser.add_argument("--budget", type=int, help="labelled examples after the last round")
    parser.add_argument("--rounds", type=int, help="selection rounds after the cold start")
    parser.add_argument("--growth", choices=["linear", "geometric"])
    parser.add_argument("--pool-size", type=int, help="ChemProt training examples to select from")
    parser.add_argument("--pool-max", type=int, help="score at most this many pool examples a round")
    parser.add_argument("--val-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--steps", type=int, help="fine-tuning steps per round")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on 2 shared cores one thread ran faster than two)")
    parser.add_argument("--workdir", type=Path, help="where data and checkpoints go (default: a temporary folder, "
                                                     "removed at the end)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "active_learning.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "active_learning.png")
    args = parser.parse_args()
    settings = {k: v if getattr(args, k) is None else getattr(args, k)
                for k, v in (QUICK if args.quick else FULL).items()}
    settings |= {"pool_max": args.pool_max, "max_length": args.max_length}
    if "random" not in settings["strategies"]:
        parser.error("--strategies must include random: it is the baseline every ratio is taken against")

    import torch

    torch.set_num_threads(args.threads)
    recipe = load_recipe(ROOT / "domains" / "biomedical.yaml")
    select = active_learning.Config(task=TASK, initial=settings["initial"], budget=settings["budget"],
                                  rounds=settings["rounds"], growth=settings["growth"], pool_max=settings["pool_max"])
    tuning = recipe.stages.finetune.model_copy(update={
        "max_steps": settings["steps"], "epochs": None, "max_length": settings["max_length"],
        "eval_every": settings["steps"], "early_stopping": None,  # one validation, at the end of each round
    })
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="active-learning-"))
    base = materialize_base_model(recipe.model, out_dir=workdir / "models", tokenizer_texts=None, seed=recipe.seed)
    full = prepare_task(TASK, recipe.tasks[TASK], out_dir=workdir / "datasets", seed=recipe.seed)
    task = shrink(full, settings["pool_size"], settings["val_size"], settings["test_size"], recipe.seed,
                  workdir / "datasets")
    print(f"{TASK}: pool {task.train.rows} of {full.train.rows} training examples, validation {task.validation.rows}, "
          f"test {task.test.rows}; budgets {select.sizes()} ({select.growth}); strategies {settings['strategies']}; "
          f"seeds {settings['seeds']}; {tuning.max_steps} steps a round (batch {tuning.batch_size}, lr "
          f"{tuning.lr}, head lr {tuning.head_lr}, ≤ {tuning.max_length} tokens); torch threads "
          f"{torch.get_num_threads()}", flush=True)

    started = time.perf_counter()
    finetune_seconds: list[float] = []
    cached = shared_finetune(finetune_seconds)
    pool = load_records(task.train)
    runs = []
    for seed in settings["seeds"]:
        for strategy in settings["strategies"]:
            t0 = time.perf_counter()
            result = active_learning.run(select.model_copy(update={"strategy": strategy}),
                                         active_learning.Inputs(base=base, task=task, finetune=tuning),
                                         StageEnv(work_dir=workdir / "stages", seed=seed), finetune_round=cached)
            labels = Counter(pool[s.index]["label"] for s in result.selected)
            runs.append({"strategy": strategy, "seed": seed, "seconds": time.perf_counter() - t0,
                         "curve": [{"labelled": p.labelled, "round": p.round, "metrics": p.metrics}
                                   for p in result.curve],
                         "selected_labels": dict(labels.most_common()),
                         "selected": [{"index": s.index, "round": s.round, "score": s.score}
                                      for s in result.selected]})
            print(f"  seed {seed} {strategy:<8} " + "  ".join(
                f"{p.labelled}: {p.metrics['test_macro_f1']:.3f}/{p.metrics['test_micro_f1']:.3f}"
                for p in result.curve) + f"  (macro/micro; {len(labels)} classes selected; "
                f"{runs[-1]['seconds']:.0f} s)", flush=True)
            # Written after every run, so an interrupted benchmark keeps what it finished.
            args.out.write_text(json.dumps({"settings": settings, "runs": runs, "complete": False}, indent=2))
    seconds = time.perf_counter() - started

    strategies = settings["strategies"]
    rows = []
    print()
    print(f"{'labelled':>8} {'strategy':<9} {'test macro-F1':>17} {'test micro-F1':>17} {'macro ×':>8} "
          f"{'micro ×':>8}   (mean ± std over {len(settings['seeds'])} seeds; × = ratio to random)")
    for size in select.sizes() if select.evaluate_final else select.sizes()[:-1]:
        baseline = {m: summarize(curve_table(runs, "random", m)[size])[0] for m in ("test_macro_f1", "test_micro_f1")}
        for strategy in strategies:
            macro, macro_sd = summarize(curve_table(runs, strategy, "test_macro_f1")[size])
            micro, micro_sd = summarize(curve_table(runs, strategy, "test_micro_f1")[size])
            row = {"labelled": size, "strategy": strategy, "macro_f1": macro, "macro_f1_std": macro_sd,
                   "micro_f1": micro, "micro_f1_std": micro_sd, "macro_ratio": macro / baseline["test_macro_f1"],
                   "micro_ratio": micro / baseline["test_micro_f1"]}
            rows.append(row)
            print(f"{size:>8} {strategy:<9} {macro:>9.4f} ± {macro_sd:.4f} {micro:>9.4f} ± {micro_sd:.4f} "
                  f"{row['macro_ratio']:>8.3f} {row['micro_ratio']:>8.3f}")
    majority = {s: statistics.fmean(max(r["selected_labels"].values()) / sum(r["selected_labels"].values())
                                    for r in runs if r["strategy"] == s) for s in strategies}
    classes = {s: statistics.fmean(len(r["selected_labels"]) for r in runs if r["strategy"] == s) for s in strategies}
    print("selected at the full budget: " + "; ".join(
        f"{s} {classes[s]:.1f} classes, most frequent {majority[s]:.0%}" for s in strategies))
    print(f"{len(finetune_seconds)} fine-tuning runs (round 0 shared by the strategies), "
          f"{statistics.fmean(finetune_seconds):.0f} s each on average; whole benchmark {seconds / 60:.1f} min")

    final = rows[-len(strategies):]
    headline = {"budget": final[0]["labelled"], "seeds": len(settings["seeds"])}
    for row in final:
        headline[f"{row['strategy']}_macro_f1"] = round(row["macro_f1"], 4)
        headline[f"{row['strategy']}_micro_f1"] = round(row["micro_f1"], 4)
    for row in final:
        if row["strategy"] != "random":
            headline[f"{row['strategy']}_macro_ratio"] = round(row["macro_ratio"], 3)
            headline[f"{row['strategy']}_micro_ratio"] = round(row["micro_ratio"], 3)
    headline["minutes"] = round(seconds / 60, 1)
    plot(runs, strategies, args.plot, log_x=select.growth == "geometric")
    args.out.write_text(json.dumps({"settings": settings, "budgets": select.sizes(), "pool_rows": task.train.rows,
                                    "test_rows": task.test.rows, "seconds": seconds, "finetune_seconds":
                                    finetune_seconds, "table": rows, "runs": runs, "headline": headline,
                                    "complete": True}, indent=2))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwritten {args.out} and {args.plot}")
    print(" ".join(f"{k}={v}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
