"""Where a training step's time goes, and whether `torch.compile` pays off here: real MiniLM, 2 CPU cores.

    python bench/step_profile.py            # ~4 min: profile 10 pretraining steps, then eager vs compiled
    python bench/step_profile.py --no-compile

1. Profile: the pretraining stage's own pieces (collate = masking a batch of packed blocks; forward + loss;
   backward; clip; fused AdamW step; zero_grad), timed with perf_counter around each over `--steps` steps
   after 2 warm-up steps, as shares of the step.
2. Compile: the same steps with the encoder under `torch.compile` (inductor), steady-state step time against
   eager in the same run, plus the one-off compile time.

Prints a table, writes bench/step_profile.json, and ends with a key=value line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ABSTRACTS = ROOT.parent / "shared/data/biomedical/unlabelled_ncbi_abstracts/abstracts.txt"
BATCH, BLOCK, SEED = 16, 128, 13


def setup():
    from adaptflow.config import ModelConfig
    from adaptflow.data.blocks import BlockSampler, pack_texts
    from adaptflow.data.tokens import TokenStore
    from adaptflow.models import load_model, materialize_base_model
    from adaptflow.objectives import build_objective
    from adaptflow.train import adamw

    base = materialize_base_model(ModelConfig(name="minilm"), out_dir=Path("/tmp"), tokenizer_texts=None, seed=SEED)
    model, tokenizer = load_model(base, "mlm", seed=SEED)
    objective = build_objective("mlm", tokenizer, mlm_probability=0.15, whole_word_masking=False)
    docs = [line.strip() for line in ABSTRACTS.read_text().splitlines() if line.strip()]
    work = Path(tempfile.mkdtemp(prefix="step-profile-"))
    blocks = pack_texts(docs, tokenizer, "mlm", BLOCK, datasets_dir=work, store=TokenStore(work / "tokens"))
    optimizer = adamw([{"params": [p for p in model.parameters()], "weight_decay": 0.01}], lr=5e-5)
    return model, objective, BlockSampler([(blocks, 1.0)], BATCH, SEED), optimizer


def timed_steps(model, objective, sampler, optimizer, steps: int, first: int = 0) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {k: [] for k in ("collate", "forward+loss", "backward", "clip", "optimizer",
                                                     "zero_grad", "step")}
    model.train()
    for i in range(first, first + steps):
        t0 = time.perf_counter()
        batch = objective.collate(sampler(i), torch.Generator().manual_seed(i))
        t1 = time.perf_counter()
        loss = objective.loss(model, batch) / batch["n_targets"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t4 = time.perf_counter()
        optimizer.step()
        t5 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0),
                                strict=True):
            parts[key].append(seconds)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "step_profile.json")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    model, objective, sampler, optimizer = setup()
    timed_steps(model, objective, sampler, optimizer, 2)  # warm-up
    eager = timed_steps(model, objective, sampler, optimizer, args.steps, first=2)
    mean = {k: sum(v) / len(v) for k, v in eager.items()}
    result = {"threads": torch.get_num_threads(), "steps": args.steps,
              "eager_ms": {k: 1000 * v for k, v in mean.items()},
              "eager_share": {k: v / mean["step"] for k, v in mean.items() if k != "step"}}
    print(f"{'part':<14}{'ms/step':>9}{'share':>8}   (eager, {torch.get_num_threads()} threads)")
    for key, ms in result["eager_ms"].items():
        share = result["eager_share"].get(key)
        print(f"{key:<14}{ms:>9.1f}{'' if share is None else f'{share:>8.1%}'}")

    if not args.no_compile:
        from adaptflow.objectives.mlm import split_mlm_head

        body, _ = split_mlm_head(model)
        started = time.perf_counter()
        model.base_model.forward = torch.compile(body.forward)  # the encoder, where the FLOPs are
        timed_steps(model, objective, sampler, optimizer, 2, first=100)  # compiles (and recompiles) here
        compile_s = time.perf_counter() - started
        compiled = timed_steps(model, objective, sampler, optimizer, args.steps, first=102)
        compiled_step = sum(compiled["step"]) / len(compiled["step"])
        result |= {"compile_s": compile_s, "compiled_step_ms": 1000 * compiled_step,
                   "compiled_vs_eager": mean["step"] / compiled_step}
        print(f"\ncompiled step {1000 * compiled_step:.1f} ms vs eager {1000 * mean['step']:.1f} ms: "
              f"{result['compiled_vs_eager']:.2f}x; compiling took {compile_s:.0f} s")
    args.out.write_text(json.dumps(result, indent=2))
    shares = result["eager_share"]
    print(f"collate_share={shares['collate']:.3f} optimizer_share={shares['optimizer']:.3f} "
          f"forward_backward_share={shares['forward+loss'] + shares['backward']:.3f}"
          + (f" compiled_vs_eager={result['compiled_vs_eager']:.2f}" if "compiled_vs_eager" in result else ""))


if __name__ == "__main__":
    main()
