"""One rank of a distributed loop test (run by tests/train/test_distributed.py, alone or under torchrun).

    python tests/train/distributed_worker.py OUT --accum A [--zero STAGE] [--steps N] [--states DIR [--crash-at K]]

Trains a tiny GPT-2 (dropout off) on packed abstracts through the one training loop, with Adam and
clipping. With `--states` it resumes from the latest save there and saves every 2 steps; `--crash-at K`
stops the run just before step K, as a crash would. Rank 0 writes `initial.safetensors` (the weights before
training), the per-step losses, and the consolidated checkpoint (gathered under ZeRO-3) in OUT/final.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adaptflow.data.blocks import BlockSampler  # noqa: E402
from adaptflow.data.corpus import read_texts  # noqa: E402
from adaptflow.models import save_checkpoint  # noqa: E402
from adaptflow.objectives import build_objective  # noqa: E402
from adaptflow.train import DeepSpeedEngine, LoopSettings, Runtime, TorchEngine, train  # noqa: E402
from adaptflow.train.checkpointing import latest_training_state  # noqa: E402
from tests.conftest import DATA_ROOT, build_tiny, pack_texts  # noqa: E402

MICRO_BATCH = 4


class Crash(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--zero", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--states", type=Path, default=None)
    parser.add_argument("--crash-at", type=int, default=None)
    args = parser.parse_args()

    runtime = Runtime.from_env()
    texts = read_texts(str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"), max_rows=60)
    model, tokenizer = build_tiny("gpt2", texts)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    initial = {name: p.detach().clone() for name, p in model.state_dict().items()}
    blocks = pack_texts(texts, tokenizer, "clm", 32, tempfile.mkdtemp(prefix="adaptflow-worker-"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = LoopSettings(max_steps=args.steps, grad_accum_steps=args.accum, max_grad_norm=0.5, log_every=1,
                            save_every=2 if args.states else 0)
    if args.zero is not None:
        engine = DeepSpeedEngine(model, optimizer, runtime, config={"zero_optimization": {"stage": args.zero}},
                                 micro_batch_size=MICRO_BATCH, grad_accum_steps=args.accum, max_grad_norm=0.5,
                                 bf16=False)
    else:
        engine = TorchEngine(model, optimizer, runtime, max_grad_norm=0.5)
    start = 0
    if args.states and (latest := latest_training_state(args.states)) is not None:
        start = engine.load_state(latest)

    def crash(step: int) -> None:
        if step == args.crash_at:
            raise Crash

    losses = []
    try:
        train(model, build_objective("clm", tokenizer), BlockSampler([(blocks, 1.0)], MICRO_BATCH, seed=3), optimizer,
              settings, device=torch.device("cpu"), runtime=runtime, engine=engine, start_step=start,
              step_hooks=[crash], log_metrics=lambda step, metrics: losses.append(metrics["loss"]),
              save_state=lambda step: engine.save_state(args.states, step, tokenizer) if args.states else None)
    except Crash:
        pass
    with engine.full_parameters():
        if runtime.is_main:
            save_checkpoint(model, tokenizer, args.out / "final", lineage={})
    if runtime.is_main:
        save_file({k: v.contiguous() for k, v in initial.items()}, args.out / "initial.safetensors")
        record = {"losses": losses, "world_size": runtime.world_size, "start": start}
        (args.out / "losses.json").write_text(json.dumps(record))
    runtime.exit()


if __name__ == "__main__":
    main()
