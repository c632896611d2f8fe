"""Where things are inside a transformer: its layer stack, its task or LM head, and the pooler a new head reads."""

from __future__ import annotations

import torch
from torch import nn

from adaptflow.errors import ConfigError

HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")


def is_head(name: str) -> bool:
    """Whether parameter `name` belongs to the model's output head."""
    return name.split(".", 1)[0] in HEAD_NAMES


def transformer_layers(base: nn.Module) -> list[nn.Module]:
    """The model's stack of transformer blocks, bottom first."""
    n = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return list(module)
    raise ConfigError(f"cannot find the {n} transformer layers of {type(base).__name__}")


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters from the bottom up: [embeddings, layer 0, …, layer L-1]; the head is not included."""
    base = getattr(model, "base_model", model)
    layers = transformer_layers(base)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    head = {id(p) for name, p in model.named_parameters() if is_head(name)}
    rest = [p for p in base.parameters() if id(p) not in in_layers and id(p) not in head]
    return [rest] + [list(layer.parameters()) for layer in layers]


def reinitialise_pooler(model, seed: int) -> set[str]:
    """Give a BERT-style pooler fresh weights, as part of the new task head; return its parameter names.

    A checkpoint's pooler is often stale (sentence-embedding models such as MiniLM never train it, and
    masked-LM pretraining drops it), and re-initialising it steadies fine-tuning (Zhang et al., 2021).
    """
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is None:
        return set()
    _initialise(model, pooler, seed)
    prefix = f"{model.base_model_prefix}.pooler."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def reinitialise_head(model, seed: int) -> None:
    """Give the task head (`classifier` / `score`) fresh weights from `seed`, as if the checkpoint had none."""
    head = next(module for name, module in model.named_children() if name in HEAD_NAMES)
    _initialise(model, head, seed)


def _initialise(model, module: nn.Module, seed: int) -> None:
    """`model`'s own initialisation of `module`, from `seed`. transformers marks loaded tensors as initialised and
    its init functions then leave them alone, so the marks are cleared first."""
    for tensor in (*module.parameters(), *module.buffers()):
        tensor._is_hf_initialized = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module.apply(model._init_weights)
