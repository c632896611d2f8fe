"""Training throughput: adaptflow's stages vs the Hugging Face Trainer and a bare torch loop, real MiniLM.

    python bench/throughput.py                      # 3 repetitions, ~14 min on 2 cores
    python bench/throughput.py --reps 1 --steps 4   # a smoke run (CI-sized)

Useful (non-padding) tokens per second over the same number of optimizer steps at the same batch, each arm in
its own process (peak resident memory is the process's), arms alternating within each repetition:

  pretraining (continued MLM on the NCBI abstracts, batch 16):
    adaptflow     the pretraining stage (`stages.pretrain.run`): documents packed into 128-token blocks
    trainer       Trainer + DataCollatorForLanguageModeling, each document one sequence (truncated at the
                  model's 512 positions), padded per batch — what the Trainer's MLM recipe does line by line
    trainer-128   the same truncated at 128 tokens: sequences as short as adaptflow's blocks, but it reads only
                  the first 128 tokens of each document (for reference)
    bare          forward + the same masked-position loss, backward, clip, AdamW step, on adaptflow's
                  pre-built batches: what the loop's own machinery costs
  fine-tuning (ChemProt, batch 16, max_length 128):
    adaptflow     the fine-tuning stage (`stages.finetune.run`): length-grouped batches, dynamic padding
    trainer       Trainer's defaults: random order, DataCollatorWithPadding (pads to each batch's longest)
    bare          forward (the model's own loss), backward, clip, AdamW step on adaptflow's pre-built batches

The first `--warmup` steps of every arm are not timed. Prints the ratios (median, min, max over repetitions),
writes bench/throughput.json, and ends with a key=value line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ABSTRACTS = DATA / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"
CHEMPROT = DATA / "biomedical/chemprot/train.jsonl"
BATCH, BLOCK, MAX_LENGTH, LR, SEED = 16, 128, 128, 5e-5, 13
ARMS = {
    "pretrain": ["adaptflow", "trainer", "trainer-128", "bare"],
    "finetune": ["adaptflow", "trainer", "bare"],
}


# ---- one arm, in its own process -------------------------------------------------------------------------------


class StepClock:
    """Useful tokens and wall time of optimizer steps after the warm-up ones."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.marks = warmup, [], []

    def step_done(self, tokens: int) -> None:
        self.tokens.append(tokens)
        self.marks.append(time.perf_counter())

    def result(self) -> dict:
        timed = self.tokens[self.warmup:]  # the steps after the warm-up's last mark
        seconds = self.marks[-1] - self.marks[self.warmup - 1]
        return {"steps": len(timed), "tokens": sum(timed), "seconds": seconds,
                "tokens_per_s": sum(timed) / seconds}


def _base():
    from adaptflow.config import ModelConfig
    from adaptflow.models import materialize_base_model

    return materialize_base_model(ModelConfig(name="minilm"), out_dir=Path(tempfile.gettempdir()), tokenizer_texts=None,
                                  seed=SEED)


def _documents(n: int) -> list[str]:
    return [line.strip() for line in ABSTRACTS.read_text().splitlines() if line.strip()][:n]


def _chemprot_records() -> list[dict]:
    return [json.loads(line) for line in CHEMPROT.read_text().splitlines() if line.strip()]


def arm_pretrain_adaptflow(steps: int, warmup: int, work: Path) -> dict:
    from adaptflow.data.corpus import prepare_corpus
    from adaptflow.stages import StageEnv, pretrain

    corpus = prepare_corpus(str(ABSTRACTS), name="abstracts", out_dir=work / "datasets", validation_fraction=0.0,
                            seed=SEED)
    config = pretrain.Config(corpus="abstracts", objective="mlm", block_size=BLOCK, batch_size=BATCH,
                            max_steps=warmup + steps, lr=LR, head_warmup_steps=0, warmup_ratio=0.0,
                            log_every=1, eval_every=0, save_every=0)
    clock = StepClock(warmup)
    block_tokens = BATCH * BLOCK  # packed: every token is a document's

    def sink(step: int, metrics: dict) -> None:
        if "tokens_per_s" in metrics:
            clock.step_done(block_tokens)

    pretrain.run(config, pretrain.Inputs(base=_base(), train=corpus.train),
                 StageEnv(work_dir=work / "stages", cache_dir=work / "cache", seed=SEED, log_metrics=sink))
    return clock.result()


def arm_finetune_adaptflow(steps: int, warmup: int, work: Path) -> dict:
    from adaptflow.config import TaskDataConfig
    from adaptflow.data.labelled import prepare_task
    from adaptflow.stages import StageEnv, finetune

    task = TaskDataConfig(type="classification", train=str(CHEMPROT), validation_fraction=0.0)
    splits = prepare_task("chemprot", task, out_dir=work / "datasets", seed=SEED)
    config = finetune.Config(task="chemprot", batch_size=BATCH, max_length=MAX_LENGTH, max_steps=warmup + steps,
                            lr=LR, warmup_ratio=0.0, log_every=1, eval_every=0, early_stopping=None, seeds=[SEED])
    clock = StepClock(warmup)
    windows: list[float] = []

    def sink(step: int, metrics: dict) -> None:
        if "tokens_per_s" in metrics:  # one step per window: its tokens = rate × its duration
            now = time.perf_counter()
            duration = now - windows[-1] if windows else 0.0
            windows.append(now)
            clock.step_done(round(metrics["tokens_per_s"] * duration))

    finetune.run(config, finetune.Inputs(base=_base(), task=splits),
                 StageEnv(work_dir=work / "stages", seed=SEED, log_metrics=sink))
    return clock.result()


def _trainer_run(model, dataset, collator, steps: int, warmup: int, work: Path) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    clock = StepClock(warmup)
    counted: list[int] = []

    def counting_collator(features):
        batch = collator(features)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(counted[state.global_step - 1])

    args = TrainingArguments(output_dir=str(work / "trainer"), per_device_train_batch_size=BATCH,
                             max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="linear",
                             max_grad_norm=1.0, weight_decay=0.01, logging_steps=10_000, save_strategy="no",
                             report_to=[], dataloader_num_workers=0, use_cpu=True, seed=SEED,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collator,
            callbacks=[Clock()]).train()
    return clock.result()


class _ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def arm_pretrain_trainer(steps: int, warmup: int, work: Path, max_length: int = 512) -> dict:
    from transformers import DataCollatorForLanguageModeling

    from adaptflow.models import load_model

    model, tokenizer = load_model(_base(), "mlm", seed=SEED)
    encoded = tokenizer(_documents(BATCH * (warmup + steps)), truncation=True, max_length=max_length)
    items = [{"input_ids": ids} for ids in encoded["input_ids"]]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    return _trainer_run(model, _ListDataset(items), collator, steps, warmup, work)


def arm_finetune_trainer(steps: int, warmup: int, work: Path) -> dict:
    from transformers import DataCollatorWithPadding

    from adaptflow.models import load_task_model

    records = _chemprot_records()
    labels = sorted({r["label"] for r in records})
    model, tokenizer = load_task_model(_base(), "classification", labels, seed=SEED)
    encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=MAX_LENGTH)
    index = {label: i for i, label in enumerate(labels)}
    items = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": index[r["label"]]}
             for ids, r in zip(encoded["input_ids"], records, strict=True)]
    return _trainer_run(model, _ListDataset(items), DataCollatorWithPadding(tokenizer), steps, warmup, work)


def _bare_loop(model, batches: list[dict], steps: int, warmup: int, loss_fn=None) -> dict:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    model.train()
    clock = StepClock(warmup)
    for batch in batches:
        loss = loss_fn(batch) if loss_fn else model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch.get("attention_mask")
        clock.step_done(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
    return clock.result()


def arm_pretrain_bare(steps: int, warmup: int, work: Path) -> dict:
    import torch

    from adaptflow.data.blocks import BlockSampler, pack_texts
    from adaptflow.data.tokens import TokenStore
    from adaptflow.models import load_model
    from adaptflow.objectives import build_objective

    model, tokenizer = load_model(_base(), "mlm", seed=SEED)
    objective = build_objective("mlm", tokenizer, mlm_probability=0.15, whole_word_masking=False)
    blocks = pack_texts(_documents(10_000), tokenizer, "mlm", BLOCK, datasets_dir=work, store=TokenStore(work / "tokens"))
    sampler = BlockSampler([(blocks, 1.0)], BATCH, SEED)
    batches = [objective.collate(sampler(i), torch.Generator().manual_seed(i)) for i in range(warmup + steps)]
    # The same loss computation as the stage (the vocabulary projection of the masked positions only): this arm
    # measures what adaptflow's loop machinery costs, not what its objective saves.
    return _bare_loop(model, batches, steps, warmup, loss_fn=lambda b: objective.loss(model, b) / b["n_targets"])


def arm_finetune_bare(steps: int, warmup: int, work: Path) -> dict:
    from adaptflow import kinds
    from adaptflow.models import load_task_model
    from adaptflow.objectives.padding import model_inputs
    from adaptflow.train import BatchSampler

    records = _chemprot_records()
    labels = sorted({r["label"] for r in records})
    model, tokenizer = load_task_model(_base(), "classification", labels, seed=SEED)
    kind = kinds.get("classification")
    items = kind.encode(records, tokenizer, labels=labels, max_length=MAX_LENGTH, prompt_template=None)
    objective = kind.objective(tokenizer.pad_token_id, labels)
    sampler = BatchSampler(items, BATCH, SEED, lengths=[len(item["input_ids"]) for item in items])
    batches = []
    for i in range(warmup + steps):
        batch = objective.collate(sampler(i))
        batches.append(model_inputs(batch) | {"labels": batch["labels"]})
    return _bare_loop(model, batches, steps, warmup)


def run_arm(stage: str, arm: str, steps: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory(prefix=f"throughput-{stage}-{arm}-") as tmp:
        work = Path(tmp)
        if (stage, arm) == ("pretrain", "trainer-128"):
            result = arm_pretrain_trainer(steps, warmup, work, max_length=BLOCK)
        else:
            result = globals()[f"arm_{stage}_{arm.replace('-', '_')}"](steps, warmup, work)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---- the comparison ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "throughput.json")
    parser.add_argument("--arm", nargs=2, metavar=("STAGE", "ARM"), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(*args.arm, args.steps, args.warmup)))
        return

    env = os.environ | {"ADAPTFLOW_DATA_ROOT": str(DATA), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    runs: dict[str, dict[str, list[dict]]] = {stage: {arm: [] for arm in arms} for stage, arms in ARMS.items()}
    for rep in range(args.reps):
        for stage, arms in ARMS.items():
            order = arms[rep % len(arms):] + arms[: rep % len(arms)]  # alternate who goes first
            for arm in order:
                out = subprocess.run([sys.executable, __file__, "--arm", stage, arm, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup)], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{stage}/{arm} failed:\n{out.stderr[-4000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[stage][arm].append(result)
                print(f"rep {rep + 1} {stage:<9}{arm:<12}{result['tokens_per_s']:>9.0f} useful tokens/s  "
                      f"peak RSS {result['peak_rss_mb']:,.0f} MB", flush=True)

    def ratios(stage: str, arm: str, baseline: str) -> dict:
        values = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[stage][arm], runs[stage][baseline],
                                                                         strict=True)]
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}

    comparisons = {
        "pretrain_vs_trainer": ratios("pretrain", "adaptflow", "trainer"),
        "pretrain_vs_trainer_128": ratios("pretrain", "adaptflow", "trainer-128"),
        "pretrain_vs_bare": ratios("pretrain", "adaptflow", "bare"),
        "finetune_vs_trainer": ratios("finetune", "adaptflow", "trainer"),
        "finetune_vs_bare": ratios("finetune", "adaptflow", "bare"),
    }
    summary = {stage: {arm: {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in results),
                             "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in results)}
                       for arm, results in arms.items()} for stage, arms in runs.items()}
    args.out.write_text(json.dumps({"reps": args.reps, "steps": args.steps, "warmup": args.warmup, "batch": BATCH,
                                    "threads": env["OMP_NUM_THREADS"], "summary": summary,
                                    "comparisons": comparisons, "runs": runs}, indent=2))
    print(f"\n{'stage':<10}{'arm':<13}{'useful tok/s':>13}{'peak RSS MB':>13}")
    for stage, arms in summary.items():
        for arm, s in arms.items():
            print(f"{stage:<10}{arm:<13}{s['tokens_per_s_median']:>13,.0f}{s['peak_rss_mb_median']:>13,.0f}")
    print(f"\n{'ratio':<26}{'median':>8}{'min':>8}{'max':>8}")
    for name, r in comparisons.items():
        print(f"{name:<26}{r['median']:>8.2f}{r['min']:>8.2f}{r['max']:>8.2f}")
    print(" ".join(f"{name}={r['median']:.2f}" for name, r in comparisons.items()))


if __name__ == "__main__":
    main()
