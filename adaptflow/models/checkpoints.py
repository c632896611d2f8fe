"""The one way checkpoints are written and read: Hugging Face directories (safetensors weights, config, tokenizer,
`lineage.json`), each checked against the digest recorded when it was written.

Every stage and the evaluation read their inputs the same way: `load_model(CheckpointRef, objective)` for a
language model, `load_task_model(CheckpointRef, kind, labels)` for a model with a task head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from adaptflow import kinds
from adaptflow.errors import DataError
from adaptflow.refs import CheckpointRef

log = logging.getLogger(__name__)

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "modernbert"}
LINEAGE_FILE = "lineage.json"
LM_HEAD_FILE = "lm_head.safetensors"  # beside a classifier whose encoder also trained a language-model head
LM_HEAD_PREFIXES = ("cls.", "lm_head.")  # where masked and causal LMs keep their head


def infer_objective(checkpoint_dir: str) -> str:
    """'mlm' for encoder checkpoints, 'clm' for decoders, read from the checkpoint's config."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or []):
        return "clm"
    return "mlm" if config.get("model_type") in ENCODER_TYPES else "clm"


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """Content digest of a checkpoint's weights (every *.safetensors file, in name order)."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise DataError(
            f"no *.safetensors weights in {checkpoint_dir}; point model.path at a Hugging Face checkpoint "
            "saved with safe_serialization (adaptflow never unpickles .bin files)"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        hash_file(h, f)
    return h.hexdigest()[:16]


def hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)


def verified_path(ref: CheckpointRef | str) -> str:
    """The checkpoint directory of `ref`, after checking its weights still have the digest recorded when it was
    written (a reference without a digest, or a plain path, is taken as it is)."""
    if not isinstance(ref, CheckpointRef):
        return str(ref)
    if ref.digest and (actual := checkpoint_digest(ref.uri)) != ref.digest:
        fix = ("restore it, or point model.path at an intact checkpoint" if ref.stage == "base" else
               f"rerun from that stage (adaptflow rerun --from {ref.stage}) or restore the directory")
        raise DataError(f"the {ref.stage} checkpoint {ref.uri} has weights with digest {actual}, not the "
                        f"{ref.digest} recorded when it was written: it was modified or damaged since; {fix}")
    return ref.uri


def load_model(ref: CheckpointRef | str, objective: str, *, seed: int = 0, trust_remote_code: bool = False,
               head_from: str | Path | None = None):
    """Load (model, tokenizer) for `objective` ('mlm' | 'clm') from a checkpoint directory.

    Weights missing from the checkpoint (e.g. an MLM head on a sentence-embedding model, or on a classifier) are
    taken from `head_from` (a checkpoint with trained LM-head weights: `lm_head_source`) when given, else
    initialised from `seed`, so the "before" evaluation of a base model is reproducible; they are logged as a
    warning.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path = verified_path(ref)
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    with quiet_transformers(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model, info = auto.from_pretrained(
            path, output_loading_info=True, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    if objective == "mlm" and tokenizer.mask_token_id is None:
        raise DataError(f"tokenizer of {path} has no mask token; masked-LM pretraining needs one (use objective: clm?)")
    missing = sorted(k for k in info["missing_keys"] if not _is_tied(model, k))
    if missing and head_from is not None:
        found = _head_tensors(Path(head_from), missing)
        model.load_state_dict(found, strict=False)
        log.info("%s: its %s head comes from %s (%d tensors)", path, objective.upper(), head_from, len(found))
        missing = [k for k in missing if k not in found]
    if missing:
        log.warning(
            "%s has no trained weights for %d tensor(s) of its %s head (%s%s): they start untrained "
            "(initialised from seed %d), so its 'before' perplexity reflects an untrained head",
            path,
            len(missing),
            objective.upper(),
            ", ".join(missing[:3]),
            ", ..." if len(missing) > 3 else "",
            seed,
        )
    _check_vocabulary(path, tokenizer, model)
    return model, tokenizer


def lm_head_source(ref: CheckpointRef | str) -> Path | None:
    """The nearest checkpoint, from `ref` itself back up its lineage chain, that holds trained language-model head
    weights (its own, or an adapted classifier's `lm_head.safetensors`) and is still on disk; None when none does
    (a sentence-embedding base model has no head to start from)."""
    path = Path(ref.uri if isinstance(ref, CheckpointRef) else ref)
    candidates = [path, *(Path(link["uri"]) for link in reversed(read_lineage(path).get("chain", [])))]
    for candidate in candidates:
        if candidate.is_dir() and _head_tensors(candidate, None):
            return candidate
    return None


def _head_tensors(checkpoint: Path, names: list[str] | None) -> dict[str, torch.Tensor]:
    """LM-head tensors of `checkpoint` (the keys `names`, or every `cls.` / `lm_head.` key when None)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in (checkpoint / "model.safetensors", checkpoint / LM_HEAD_FILE):
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                wanted = key.startswith(LM_HEAD_PREFIXES) if names is None else key in names
                if wanted and key not in found:
                    found[key] = handle.get_tensor(key)
    return found


def _check_vocabulary(path, tokenizer, model) -> None:
    """A tokenizer with ids beyond the embedding table would crash (or silently misindex) mid-training."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise DataError(f"tokenizer of {path} has {len(tokenizer)} tokens but the model's embedding has {rows} "
                        "rows; the checkpoint's tokenizer and weights don't match (save both from one model)")


def load_task_model(
    ref: CheckpointRef | str,
    kind: str,
    labels: list[str] | tuple[str, ...] = (),
    *,
    seed: int = 0,
    dropout: float | None = None,
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer) with a task head from any checkpoint of the chain.

    Starting from a pretraining checkpoint, the LM head is dropped and a fresh task head is initialised from
    `seed`. A checkpoint written by the adapters strategy gets its adapters back before its weights load.
    """
    import transformers
    from transformers import AutoTokenizer

    path = verified_path(ref)
    task = kinds.get(kind)
    auto = getattr(transformers, task.auto_model)
    kwargs = {}
    if task.has_head:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    lineage = read_lineage(path)
    with quiet_transformers(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # A checkpoint with another task head (say, the adapt stage's) gets a fresh head of the right size.
        model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True,
                                     ignore_mismatched_sizes=task.has_head, **kwargs)
    _check_vocabulary(path, tokenizer, model)
    if lineage.get("strategy") == "adapters":
        from safetensors.torch import load_model as load_weights

        from adaptflow.strategies.adapters import add_bottleneck_adapters

        add_bottleneck_adapters(model, reduction=lineage["config"]["adapter_reduction"])
        load_weights(model, str(Path(path) / "model.safetensors"), strict=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    return model, tokenizer


def load_tokenizer(ref: CheckpointRef | str, *, trust_remote_code: bool = False):
    """A checkpoint's tokenizer alone, with a pad token (decoders often lack one: eos stands in)."""
    from transformers import AutoTokenizer

    path = ref.uri if isinstance(ref, CheckpointRef) else ref
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_parameter_names(model: torch.nn.Module, checkpoint_dir: str | Path) -> set[str]:
    """Names of `model`'s parameters that the checkpoint holds (anything else starts freshly initialised).

    A checkpoint of the bare encoder (`BertModel`: `encoder.layer.0…`) and one of a model with a head
    (`bert.encoder.layer.0…`) name the same weights differently; both are matched.
    """
    from safetensors import safe_open

    stored: set[str] = set()
    for f in Path(checkpoint_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            stored.update(handle.keys())
    prefix = f"{model.base_model_prefix}."
    return {n for n, _ in model.named_parameters() if n in stored or n.removeprefix(prefix) in stored}


def save_checkpoint(model, tokenizer, out_dir: str | Path, *, lineage: dict,
                    extra_files: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write a Hugging Face checkpoint (safetensors, config, tokenizer, lineage.json) atomically; return its digest.
    `extra_files` (file name → tensors) are written beside the weights as safetensors and count in the digest
    (transformers reads only its own files).

    Written to a temporary sibling directory and renamed into place, so a crash never leaves a half-written
    checkpoint where a reader would find one.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        for name, tensors in (extra_files or {}).items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / name)
        digest = checkpoint_digest(tmp)
        (tmp / LINEAGE_FILE).write_text(json.dumps({**lineage, "digest": digest}, indent=2, default=str))
        if read_lineage(out_dir).get("digest") == digest:
            # The same weights are already there (another build saved them first, and may be reading them).
            shutil.rmtree(tmp)
            return digest
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def read_lineage(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def head_labels(checkpoint_dir: str | Path) -> list[str] | None:
    """The labels of a classifier checkpoint's head, in output order (None: not a task classifier)."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(name.endswith(("ForSequenceClassification", "ForTokenClassification")) for name in architectures):
        return None
    id2label = config.get("id2label") or {}
    return [id2label[str(i)] for i in range(len(id2label))]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars; adaptflow logs what matters itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _is_tied(model, key: str) -> bool:
    # The decoder weight of an MLM head is tied to the input embeddings: "missing" but not untrained.
    if not key.endswith("decoder.weight"):
        return False
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight
