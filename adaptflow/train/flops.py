"""Training FLOPs and model FLOPs utilisation (MFU), estimated the usual way (Kaplan et al.; PaLM, appendix B).

    per token: 6·N (forward + backward through the N non-embedding weights) + 12·L·H·T (attention scores and
    values over a sequence of T tokens, L layers of width H)

MFU = achieved model FLOP/s ÷ the accelerator's peak dense FLOP/s (bf16 tensor cores with `bf16`, else TF32).
The peak comes from the GPU's name, or from `ADAPTFLOW_PEAK_TFLOPS` (any device, e.g. a CPU you measured).
"""

from __future__ import annotations

import os

import torch

# Dense peak TFLOP/s (bf16, tf32) of common training GPUs, by a distinctive part of their name.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0), "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.0), "GH200": (989.0, 494.0),
    "A100": (312.0, 156.0), "L40S": (362.0, 183.0), "L4": (121.0, 60.0), "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5), "RTX 4090": (165.0, 82.6), "RTX 3090": (71.0, 35.6), "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden width) of a transformers model (PEFT-wrapped or not)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0
    embeddings = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embeddings.add(id(module.weight))
    # Under ZeRO-3 a rank holds a shard: `ds_numel` is the whole parameter's size.
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in embeddings)
    return parameters, layers, hidden


def training_flops(shape: tuple[int, int, int], tokens: int, seq_len: int) -> float:
    """FLOPs of one forward + backward pass over `tokens` tokens in sequences of `seq_len`."""
    parameters, layers, hidden = shape
    return tokens * (6.0 * parameters + 12.0 * layers * hidden * seq_len)


def peak_flops(device: torch.device, *, bf16: bool) -> float | None:
    """The device's dense peak FLOP/s, or None when unknown (then no MFU is reported)."""
    if override := os.environ.get("ADAPTFLOW_PEAK_TFLOPS"):
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16_peak, tf32_peak) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16_peak if bf16 else tf32_peak) * 1e12
    return None
