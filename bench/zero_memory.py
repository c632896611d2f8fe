"""What ZeRO saves per rank, and what two ranks cost in step time, on the real MiniLM (CPU, gloo).

    python bench/zero_memory.py                    # 4 layouts × (2 warm-up + 8 timed steps): ~5 min on 2 cores
    python bench/zero_memory.py --steps 3          # a quick trial

Each layout trains the packaged MiniLM (22.7M parameters, masked LM) on packed NCBI abstracts (128-token
blocks) through the one training loop with AdamW, at the same global batch of 16 blocks:

    1 rank     plain torch, accumulation 2, both cores (OMP_NUM_THREADS=2)   <- the baseline
    2 ranks    plain torch, gradients all-reduced, one core each
    2 ranks    DeepSpeed ZeRO-2 (optimizer state and gradients partitioned)
    2 ranks    DeepSpeed ZeRO-3 (parameters partitioned too)

Per rank it counts the bytes of the parameters the rank holds (a ZeRO-3 shard, else the whole model) and
of its optimizer state (Adam moments, plus ZeRO's fp32 master partition), read from the live tensors, and
its peak resident memory. Step time is the mean wall time of the timed steps. Prints a table, writes
bench/zero_memory.json, and ends with a key=value line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaptflow.train.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
ABSTRACTS = ROOT.parent / "shared/data/biomedical/unlabelled_ncbi_abstracts/abstracts.txt"
GLOBAL_BATCH, BLOCK = 16, 128
LAYOUTS = [  # name, ranks, ZeRO stage (None: plain torch)
    ("1 rank, torch", 1, None),
    ("2 ranks, torch", 2, None),
    ("2 ranks, ZeRO-2", 2, 2),
    ("2 ranks, ZeRO-3", 2, 3),
]
MB = 2**20


def held_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors`."""
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def optimizer_tensors(optimizer):
    """Adam moments of the (inner) torch optimizer, plus ZeRO's fp32 master partitions when there are any."""
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    masters = [*getattr(optimizer, "single_partition_of_fp32_groups", []),  # ZeRO-1/2
               *getattr(optimizer, "fp32_partitioned_groups_flat", [])]  # ZeRO-3
    return moments + masters


def worker(out: Path, zero: int | None, steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from adaptflow.config import ModelConfig
    from adaptflow.data.blocks import BlockSampler, pack_texts
    from adaptflow.data.corpus import read_texts
    from adaptflow.data.tokens import TokenStore
    from adaptflow.models import load_model, materialize_base_model
    from adaptflow.objectives import build_objective
    from adaptflow.train import DeepSpeedEngine, LoopSettings, Runtime, TorchEngine, train

    runtime = Runtime.from_env()
    out.mkdir(parents=True, exist_ok=True)
    base = materialize_base_model(ModelConfig(name="minilm"), out_dir=out / "models", tokenizer_texts=None, seed=0)
    model, tokenizer = load_model(base, "mlm", seed=0)
    objective = build_objective("mlm", tokenizer)
    blocks = pack_texts(read_texts(str(ABSTRACTS), max_rows=2000), tokenizer, "mlm", BLOCK, datasets_dir=out / "data",
                        store=TokenStore(out / f"tokens-{runtime.rank}"))
    micro, accum = GLOBAL_BATCH // 2, 2 // runtime.world_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if zero is None:
        engine = TorchEngine(model, optimizer, runtime, max_grad_norm=1.0)
    else:
        engine = DeepSpeedEngine(model, optimizer, runtime, config={"zero_optimization": {"stage": zero}},
                                 micro_batch_size=micro, grad_accum_steps=accum, max_grad_norm=1.0, bf16=False)
    sampler = BlockSampler([(blocks, 1.0)], micro, seed=0)

    def run(start: int, stop: int) -> float:
        runtime.barrier()
        began = time.perf_counter()
        train(model, objective, sampler, optimizer, LoopSettings(max_steps=stop, grad_accum_steps=accum, log_every=1),
              device=torch.device("cpu"), start_step=start, runtime=runtime, engine=engine)
        runtime.barrier()
        return time.perf_counter() - began

    run(0, 2)  # warm-up: allocates the optimizer state
    seconds = run(2, 2 + steps)
    params = [getattr(p, "ds_tensor", p.data) for p in model.parameters()]
    record = {
        "param_mb": held_bytes(params) / MB,
        "optimizer_mb": held_bytes(optimizer_tensors(engine.optimizer)) / MB,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": seconds / steps,
        "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
    }
    (out / f"rank{runtime.rank}.json").write_text(json.dumps(record))
    runtime.exit()


def measure(ranks: int, zero: int | None, steps: int, out: Path) -> dict:
    args = [str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(steps)]
    args += ["--zero", str(zero)] if zero is not None else []
    env = os.environ | {"DS_ACCELERATOR": "cpu", "ADAPTFLOW_DEVICE": "cpu", "PYTHONPATH": str(ROOT),
                        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    if ranks == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   f"--master-port={free_port()}", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {key: max(r[key] for r in per_rank) for key in per_rank[0]}  # the busiest rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per layout")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/zero_memory.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.zero, args.steps)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, ranks, zero) in enumerate(LAYOUTS):
            results[name] = measure(ranks, zero, args.steps, Path(tmp) / str(i)) | {"ranks": ranks, "zero": zero}
            print(f"measured {name}: {results[name]['seconds_per_step']:.2f} s/step", flush=True)
    baseline = results[LAYOUTS[0][0]]
    print(f"\nMiniLM ({baseline['parameters'] / 1e6:.1f}M parameters, fp32), masked LM, global batch "
          f"{GLOBAL_BATCH} × {BLOCK} tokens, AdamW, {args.steps} timed steps, {os.cpu_count()} CPU cores\n")
    print(f"{'layout':18} {'params MB':>10} {'optim MB':>9} {'state MB':>9} {'peak RSS MB':>12} "
          f"{'s/step':>7} {'time vs 1 rank':>15}")
    for name, r in results.items():
        r["state_mb"] = r["param_mb"] + r["optimizer_mb"]
        r["step_vs_one_rank"] = r["seconds_per_step"] / baseline["seconds_per_step"]
        print(f"{name:18} {r['param_mb']:10.1f} {r['optimizer_mb']:9.1f} {r['state_mb']:9.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['seconds_per_step']:7.2f} {r['step_vs_one_rank']:15.2f}")
    args.out.write_text(json.dumps({"steps": args.steps, "global_batch": GLOBAL_BATCH, "block": BLOCK,
                                    "results": results}, indent=2))
    z2, z3 = results["2 ranks, ZeRO-2"], results["2 ranks, ZeRO-3"]
    print(f"\nwrote {args.out}")
    print(f"torch_state_mb={baseline['state_mb']:.1f} zero2_state_mb={z2['state_mb']:.1f} "
          f"zero3_state_mb={z3['state_mb']:.1f} zero3_vs_zero2_state={z3['state_mb'] / z2['state_mb']:.2f} "
          f"zero2_step_vs_1rank={z2['step_vs_one_rank']:.2f} zero3_step_vs_1rank={z3['step_vs_one_rank']:.2f}")


if __name__ == "__main__":
    main()
