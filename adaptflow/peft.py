"""Fine-tuning strategies: which weights train, at which learning rate, and on which schedule.

    full                 every weight trains
    lora, adalora,       PEFT methods (the recipe's `peft:` mapping is passed to the PEFT config as is:
    gralora, ia3         r, lora_alpha, lora_dropout, target_modules, ...); the task head trains fully
    adapters             bottleneck adapters after each layer's attention and feed-forward outputs
                         (the `adapters` library pins transformers 4.x, so this is a small module of our own)
    feature_extraction   the encoder is frozen; only the head trains
    gradual_unfreezing   ULMFiT: the head first, then one more layer group from the top every N steps
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptflow.errors import ConfigError

log = logging.getLogger(__name__)

PEFT_METHODS = {"lora", "adalora", "gralora", "ia3"}
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")
TASK_TYPES = {"classification": "SEQ_CLS", "ner": "TOKEN_CLS", "sft": "CAUSAL_LM"}


@dataclass
class Strategy:
    """A model prepared for one strategy, with the hooks the training loop must call."""

    model: nn.Module
    step_hooks: list[Callable[[int], None]] = field(default_factory=list)
    post_step_hooks: list[Callable[[int], None]] = field(default_factory=list)
    is_peft: bool = False


def apply_strategy(
    model: nn.Module,
    strategy: str,
    *,
    kind: str,
    peft_config: dict | None = None,
    adapter_reduction: int = 16,
    unfreeze_every: int = 50,
    total_steps: int = 1,
    new_parameters: set[str] = frozenset(),
    seed: int = 0,
) -> Strategy:
    """Prepare `model` for `strategy`; weights it adds (LoRA, adapters) start from `seed`, whatever this
    process drew from its random generator before.

    `new_parameters` names the weights the starting checkpoint did not have (a task head, and e.g. BERT's
    pooler after masked-LM pretraining): they start random, so every strategy trains them — and PEFT saves
    them with the adapter, or the adapter alone could not reproduce the model.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _apply(model, strategy, kind=kind, peft_config=peft_config, adapter_reduction=adapter_reduction,
                      unfreeze_every=unfreeze_every, total_steps=total_steps, new_parameters=new_parameters)


def _apply(model, strategy, *, kind, peft_config, adapter_reduction, unfreeze_every, total_steps,
           new_parameters) -> Strategy:
    def is_new(name: str) -> bool:
        return _is_head(name) or name in new_parameters

    if strategy == "full":
        return Strategy(model)
    if strategy in PEFT_METHODS:
        extra = sorted({name.rsplit(".", 1)[0] for name in new_parameters if not _is_head(name)})
        return _peft(model, strategy, kind=kind, options=dict(peft_config or {}), total_steps=total_steps,
                     extra_modules=extra)
    if strategy == "adapters":
        add_bottleneck_adapters(model, reduction=adapter_reduction)
        _freeze_all_but(model, lambda name: ".adapter." in f".{name}" or is_new(name))
        return Strategy(model)
    if strategy == "feature_extraction":
        _freeze_all_but(model, is_new)
        return Strategy(model)
    if strategy == "gradual_unfreezing":
        return Strategy(model, step_hooks=[gradual_unfreezing(model, every=unfreeze_every)])
    raise ConfigError(f"unknown fine-tuning strategy {strategy!r}")


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(1, total)


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters from the bottom up: [embeddings, layer 0, …, layer L-1]; the head is not included."""
    base = getattr(model, "base_model", model)
    layers = _transformer_layers(base)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    head = {id(p) for name, p in model.named_parameters() if _is_head(name)}
    rest = [p for p in base.parameters() if id(p) not in in_layers and id(p) not in head]
    return [rest] + [list(layer.parameters()) for layer in layers]


def layerwise_lr_groups(model: nn.Module, lr: float, decay: float, head_lr: float | None, weight_decay: float):
    """Optimizer groups where layer l of L gets lr · decay^(L − l) (embeddings the smallest), the head `head_lr`."""
    groups = layer_groups(model)
    depth = len(groups) - 1
    grouped = {id(p) for g in groups for p in g}
    head = [p for p in model.parameters() if id(p) not in grouped]
    out = []
    for level, params in enumerate(groups):
        out += param_groups(params, lr * decay ** (depth - level), weight_decay, name=f"layer{level}")
    return out + param_groups(head, head_lr or lr, weight_decay, name="head")


def param_groups(params, lr: float, weight_decay: float, name: str) -> list[dict]:
    """`params` split into decayed (matrices) and undecayed (biases, norms) groups at `lr`.

    Frozen parameters are included on purpose: AdamW skips any without a gradient, and a schedule that
    unfreezes them later (gradual unfreezing) finds them already in the optimizer.
    """
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": name},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": name},
    ]
    return [g for g in groups if g["params"]]


def gradual_unfreezing(model: nn.Module, *, every: int) -> Callable[[int], None]:
    """A step hook: at step s, the head and the top 1 + s // every layer groups train; the rest is frozen."""
    groups = layer_groups(model)
    state = {"open": -1}

    def hook(step: int) -> None:
        open_groups = min(len(groups), 1 + step // every)
        if open_groups == state["open"]:
            return
        state["open"] = open_groups
        for level, params in enumerate(groups):
            trainable = level >= len(groups) - open_groups
            for p in params:
                p.requires_grad_(trainable)
        log.info("gradual unfreezing: step %d, top %d of %d layer groups train", step, open_groups, len(groups))

    hook(0)
    return hook


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))), with `up` zero-initialised so the adapted model starts as the original."""

    def __init__(self, hidden: int, reduction: int):
        super().__init__()
        self.down = nn.Linear(hidden, max(1, hidden // reduction))
        self.up = nn.Linear(max(1, hidden // reduction), hidden)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class _Adapted(nn.Module):
    """A projection followed by a bottleneck adapter (placed before the block's residual add and norm)."""

    def __init__(self, projection: nn.Module, reduction: int):
        super().__init__()
        self.projection = projection
        self.adapter = BottleneckAdapter(_out_features(projection), reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.projection(x))


def add_bottleneck_adapters(model: nn.Module, *, reduction: int = 16) -> int:
    """Houlsby-style adapters after the attention-output and feed-forward-output projections of each layer."""
    count = 0
    for layer in _transformer_layers(getattr(model, "base_model", model)):
        for parent_path, child in (("attention.output", "dense"), ("output", "dense"),  # BERT family
                                   ("attn", "c_proj"), ("mlp", "c_proj"),  # GPT-2
                                   ("self_attn", "o_proj"), ("mlp", "down_proj")):  # Llama family
            parent = _get(layer, parent_path)
            projection = getattr(parent, child, None) if parent is not None else None
            if projection is not None and hasattr(projection, "weight") and not isinstance(projection, _Adapted):
                setattr(parent, child, _Adapted(projection, reduction))
                count += 1
    if not count:
        raise ConfigError(f"strategy adapters: no known projection layers in {type(model).__name__}")
    return count


def _peft(model: nn.Module, method: str, *, kind: str, options: dict, total_steps: int,
          extra_modules: list[str]) -> Strategy:
    import peft

    classes = {"lora": peft.LoraConfig, "adalora": peft.AdaLoraConfig, "gralora": peft.GraloraConfig,
               "ia3": peft.IA3Config}
    options.setdefault("task_type", TASK_TYPES[kind])
    if method == "adalora":
        options.setdefault("total_step", total_steps)
    if method == "gralora" and "target_modules" not in options:
        options["target_modules"] = _attention_projections(model)
    if extra_modules and kind != "sft":
        # PEFT adds the task head itself for SEQ_CLS / TOKEN_CLS; newly initialised modules must join it.
        default_heads = ["classifier", "score"]
        options["modules_to_save"] = sorted({*(options.get("modules_to_save") or default_heads), *extra_modules})
    try:
        config = classes[method](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"stages.finetune.peft for {method}: {err}") from None
    wrapped = peft.get_peft_model(model, config)
    post = []
    if method == "adalora":
        post.append(lambda step: wrapped.base_model.update_and_allocate(step))
    log.info("%s: %.2f%% of parameters train", method, 100 * trainable_fraction(wrapped))
    return Strategy(wrapped, post_step_hooks=post, is_peft=True)


def _attention_projections(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for candidates in (["query", "value"], ["q_proj", "v_proj"], ["c_attn"]):
        if set(candidates) <= names:
            return candidates
    raise ConfigError("could not guess target_modules for this architecture; set stages.finetune.peft.target_modules")


def _transformer_layers(base: nn.Module) -> list[nn.Module]:
    n = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return list(module)
    raise ConfigError(f"cannot find the {n} transformer layers of {type(base).__name__}")


def _freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))


def _is_head(name: str) -> bool:
    return name.split(".", 1)[0] in HEAD_NAMES


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _out_features(module: nn.Module) -> int:
    # nn.Linear says so; GPT-2's Conv1D stores its weight as [in, out].
    return getattr(module, "out_features", None) or module.weight.shape[-1]
