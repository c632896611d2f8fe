"""Training throughput and model FLOPs utilisation on one GPU: a BERT-large-size encoder under DeepSpeed ZeRO-2.

    python bench/gpu_throughput.py                  # on a lent GPU: ~3 min
    python bench/gpu_throughput.py --smoke          # a tiny encoder on CPU, to check the script itself
    python bench/gpu_throughput.py --corpus abstracts.txt --tokenizer minilm/   # without shared/ or the MiniLM package

A randomly initialised BERT-large-shaped masked LM (24 layers, hidden 1024, 16 heads, ~335M parameters)
trains through adaptflow's own loop and DeepSpeed engine (ZeRO-2, bf16) on 512-token blocks of the NCBI
abstracts. The baseline is the GPU's own bf16 matmul throughput, measured first in the same run (8192³
matmuls), so MFU = achieved model FLOPs / measured peak, not a datasheet number. Model FLOPs per token are
6·N + 12·L·H·S (N non-embedding parameters, L layers, H hidden size, S sequence length: forward and
backward, attention included; Chowdhery et al., 2022). Ends with a key=value line.
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
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
SMOKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def matmul_peak(device: torch.device, *, size: int, repeats: int) -> float:
    """Measured bf16 matmul FLOP/s on `device` (the baseline MFU is reported against)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - began)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny encoder, short blocks, CPU allowed")
    # Measured on one H200 (bench/gpu_throughput.json): MFU 11.7 % at 16, 23.7 % at 32, 32.6 % at 64 (38 GiB),
    # 38.3 % at 128 (71 GiB): small batches leave the GPU waiting on kernel launches.
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after 3 warm-up steps)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers here as JSON")
    parser.add_argument("--corpus", type=Path, default=ABSTRACTS, help="plain-text corpus, one document a line")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (vocab.txt, tokenizer.json, ...); default: the packaged MiniLM's")
    args = parser.parse_args()
    if args.smoke:
        args.micro_batch, args.seq, args.steps = 2, 64, 2

    import sys

    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from adaptflow.data.blocks import BlockSampler, pack_texts
    from adaptflow.data.corpus import read_texts
    from adaptflow.data.tokens import TokenStore
    from adaptflow.models import packaged_model_path
    from adaptflow.objectives import build_objective
    from adaptflow.train import DeepSpeedEngine, LoopSettings, Runtime, train

    runtime = Runtime()
    device = runtime.device()
    if device.type != "cuda" and not args.smoke:
        sys.exit("no GPU here: this benchmark is for a lent GPU (use --smoke to check the script on CPU)")
    shape = SMOKE if args.smoke else LARGE
    peak = matmul_peak(device, size=512 if args.smoke else 8192, repeats=3 if args.smoke else 50)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or packaged_model_path("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max(512, args.seq), **shape)
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    flops_per_token = 6 * non_embedding + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * args.seq

    texts = read_texts(str(args.corpus), max_rows=300 if args.smoke else None)
    work = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    blocks = pack_texts(texts, tokenizer, "mlm", args.seq, datasets_dir=work, store=TokenStore(work / "tokens"))
    objective = build_objective("mlm", tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    engine = DeepSpeedEngine(model, optimizer, runtime, config={"zero_optimization": {"stage": 2}},
                             micro_batch_size=args.micro_batch, grad_accum_steps=1, max_grad_norm=1.0,
                             bf16=device.type == "cuda")
    sampler = BlockSampler([(blocks, 1.0)], args.micro_batch, seed=0)

    def run(start: int, stop: int) -> float:
        synchronize(device)
        began = time.perf_counter()
        train(model, objective, sampler, optimizer, LoopSettings(max_steps=stop, log_every=max(1, stop - start),
              bf16=device.type == "cuda"), device=device, start_step=start, engine=engine)
        synchronize(device)
        return time.perf_counter() - began

    run(0, 3)
    seconds = run(3, 3 + args.steps)
    tokens_per_s = args.micro_batch * args.seq * args.steps / seconds
    achieved = tokens_per_s * flops_per_token
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": non_embedding + embedding, "non_embedding_parameters": non_embedding,
        "micro_batch": args.micro_batch, "seq": args.seq, "steps": args.steps, "seconds": seconds,
        "tokens_per_s": tokens_per_s, "model_tflops": achieved / 1e12, "peak_bf16_tflops": peak / 1e12,
        "mfu": achieved / peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(f"{result['device']}: BERT-{'smoke' if args.smoke else 'large'} shape, {result['parameters'] / 1e6:.0f}M "
          f"parameters, ZeRO-2, bf16={device.type == 'cuda'}, micro-batch {args.micro_batch} × {args.seq} tokens, "
          f"{args.steps} timed steps")
    print(f"  {tokens_per_s:,.0f} tokens/s, {result['model_tflops']:.1f} model TFLOP/s; measured bf16 matmul "
          f"peak {result['peak_bf16_tflops']:.1f} TFLOP/s → MFU {result['mfu']:.1%}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"tokens_per_s={tokens_per_s:.0f} model_tflops={result['model_tflops']:.2f} "
          f"peak_bf16_tflops={result['peak_bf16_tflops']:.2f} mfu={result['mfu']:.4f}")


if __name__ == "__main__":
    main()
