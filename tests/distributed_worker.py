"""One rank of a distributed loop test (run by tests/test_distributed.py, alone or under torchrun).

    python tests/distributed_worker.py OUT_DIR ACCUM [DEEPSPEED_ZERO_STAGE]

Trains a tiny GPT-2 (dropout off) for a few steps on packed abstracts through the one training loop, with
Adam and clipping. Rank 0 writes the per-step losses and the final weights (gathered under ZeRO-3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptflow.data import read_texts  # noqa: E402
from adaptflow.distributed import DeepSpeedEngine, Runtime  # noqa: E402
from adaptflow.objectives import build_objective  # noqa: E402
from adaptflow.tokenize import pack_blocks, tokenize_corpus  # noqa: E402
from adaptflow.train import BatchSampler, LoopSettings, train  # noqa: E402
from tests.conftest import DATA_ROOT, build_tiny  # noqa: E402

MICRO_BATCH, STEPS = 4, 4


def main() -> None:
    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    zero_stage = int(sys.argv[3]) if len(sys.argv) > 3 else None
    runtime = Runtime.from_env()
    texts = read_texts(str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"), max_rows=60)
    model, tokenizer = build_tiny("gpt2", texts)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    blocks = pack_blocks(tokenize_corpus(texts, tokenizer, objective="clm"), 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = LoopSettings(max_steps=STEPS, grad_accum_steps=accum, max_grad_norm=0.5, log_every=1)
    engine = None
    if zero_stage is not None:
        engine = DeepSpeedEngine(model, optimizer, runtime, config={"zero_optimization": {"stage": zero_stage}},
                                 micro_batch_size=MICRO_BATCH, grad_accum_steps=accum, max_grad_norm=0.5, bf16=False)
    losses = []
    train(model, build_objective("clm", tokenizer), BatchSampler(blocks, MICRO_BATCH, seed=3), optimizer, settings,
          device=torch.device("cpu"), runtime=runtime, engine=engine,
          log_metrics=lambda step, metrics: losses.append(metrics["loss"]))
    gather = engine.full_parameters() if engine is not None else torch.no_grad()
    with gather:
        weights = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, out / "weights.safetensors")
        (out / "losses.json").write_text(json.dumps({"losses": losses, "world_size": runtime.world_size}))
    runtime.close()


if __name__ == "__main__":
    main()
