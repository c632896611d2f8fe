"""The recipe schema: one typed model per section, loaded in layers (defaults → recipe YAML → overrides).

A recipe is pure data. `load_recipe` validates all of it at once and raises a `RecipeError` listing every
problem with its dotted path and offending value, so a user fixes a recipe in one pass, before any compute.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adaptflow.errors import RecipeError

DATA_ROOT_ENV = "ADAPTFLOW_DATA_ROOT"
DEFAULT_DATA_ROOT = "../shared/data"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Probability = Annotated[float, Field(gt=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(Section):
    """A small model built from config (tests, smoke runs), with a tokenizer trained locally."""

    architecture: Literal["bert", "gpt2", "llama"] = "bert"
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 128
    max_position_embeddings: PositiveInt = 512
    vocab_size: Annotated[int, Field(ge=100)] = 2000
    tokenizer_corpus: str = "domain"

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


class ModelConfig(Section):
    """The base model: exactly one of a packaged short `name`, a local `path`, or a `tiny` config."""

    name: Literal["minilm"] | None = None
    path: str | None = None
    tiny: TinyModelConfig | None = None
    trust_remote_code: bool = False
    # Weights only as pickle (pytorch_model*.bin) are refused: unpickling a file can run code. Set this only for
    # a checkpoint you trust; it is then read with torch's tensors-only unpickler and converted to safetensors.
    allow_pickle_weights: bool = False

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        given = [k for k in ("name", "path", "tiny") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of model.name (e.g. 'minilm'), model.path or model.tiny; got {given or 'none'}"
            )
        return self


class CorpusConfig(Section):
    """A text corpus. `path` is an `s3://` URI, an absolute path, or relative to the data root."""

    path: str
    format: Literal["auto", "txt", "jsonl", "csv", "parquet"] = "auto"
    text_field: str = "text"
    max_documents: PositiveInt | None = None
    validation_fraction: Fraction = 0.05


PathList = str | list[str]


class TaskDataConfig(Section):
    """A labelled task: where its splits live and which fields hold text and labels.

    `type` is `classification` (single label per text, optional text pair), `ner` (IOB2 tags per token,
    from CoNLL-style files) or `sft` (prompt → response pairs for decoders). Each split is one path or a
    list of paths (concatenated). Without `validation`, `validation_fraction` of train is held out.
    """

    type: Literal["classification", "ner", "sft"]
    train: PathList
    validation: PathList | None = None
    test: PathList | None = None
    format: Literal["auto", "jsonl", "csv", "parquet", "conll"] = "auto"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: list[str] | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    token_column: int = 0
    tag_column: int = -1
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_examples: PositiveInt | None = None


class ReplayConfig(Section):
    """Mix general text into pretraining against forgetting: `ratio` of the training blocks come from it."""

    corpus: str
    ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1


class PretrainConfig(Section):
    """Continued domain pretraining (DAPT/TAPT): masked LM for encoders, causal LM for decoders."""

    enabled: bool = True
    corpus: str = "domain"
    objective: Literal["auto", "mlm", "clm"] = "auto"
    mlm_probability: Probability = 0.15
    whole_word_masking: bool = False
    block_size: Annotated[int, Field(ge=8)] = 128
    batch_size: PositiveInt = 16
    grad_accum_steps: PositiveInt = 1
    max_steps: PositiveInt = 200
    lr: PositiveFloat = 1e-4
    head_lr: PositiveFloat | None = None
    head_warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.06
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: PositiveFloat | None = 1.0
    bf16: bool = False
    log_every: PositiveInt = 10
    eval_every: Annotated[int, Field(ge=0)] = 50
    eval_max_blocks: PositiveInt = 64
    save_every: Annotated[int, Field(ge=0)] = 0
    replay: ReplayConfig | None = None

    @model_validator(mode="after")
    def _head_warmup_fits(self) -> PretrainConfig:
        if self.head_warmup_steps >= self.max_steps:
            raise ValueError(
                f"head_warmup_steps ({self.head_warmup_steps}) must be < max_steps ({self.max_steps}), "
                "or the encoder never trains"
            )
        return self


class RegularizerConfig(Section):
    """Pull fine-tuned weights toward the starting ones: L2-SP (uniform) or EWC (weighted by a diagonal Fisher
    of the language-modelling loss on `fisher_corpus` — a corpus name, or `task` for the task's training text)."""

    type: Literal["l2sp", "ewc"]
    strength: PositiveFloat = 0.01
    fisher_corpus: str = "task"
    fisher_batches: PositiveInt = 8


class EarlyStoppingConfig(Section):
    metric: str = "macro_f1"
    mode: Literal["max", "min"] = "max"
    patience: PositiveInt = 3
    restore_best: bool = True


class ActiveLearningConfig(Section):
    """Active-learning selection of the training examples of `task` (its train split is the pool).

    Round 0 labels `initial` random examples; each of the `rounds` that follow fine-tunes on everything selected
    so far and adds a batch chosen by `strategy` with that model, until `budget` examples are selected. Batch
    sizes grow `linear`ly (equal batches) or `geometric`ally (e.g. 100 → 200 → 400 → 800). `pool_max` scores
    at most that many random unselected examples per round (speed); `evaluate_final` also fine-tunes on the
    whole budget, so the learning curve ends at `budget`.
    """

    enabled: bool = True
    task: str
    strategy: Literal["random", "entropy", "margin", "kcenter"] = "entropy"
    budget: PositiveInt = 800
    initial: PositiveInt = 100
    rounds: PositiveInt = 3
    growth: Literal["linear", "geometric"] = "linear"
    pool_max: PositiveInt | None = None
    evaluate_final: bool = True

    @model_validator(mode="after")
    def _budget_fits_rounds(self) -> ActiveLearningConfig:
        if self.budget < self.initial + self.rounds:
            raise ValueError(
                f"budget ({self.budget}) must be at least initial ({self.initial}) + rounds ({self.rounds}), so "
                "every round selects at least one example; raise budget, or lower initial or rounds"
            )
        sizes = self.sizes()
        largest = max(sizes[i + 1] - sizes[i] for i in range(self.rounds))
        if self.pool_max is not None and self.pool_max < largest:
            raise ValueError(
                f"pool_max ({self.pool_max}) must be at least the largest round's batch ({largest}), or that round "
                "could not find enough candidates; raise pool_max or remove it (score the whole pool)"
            )
        return self

    def sizes(self) -> list[int]:
        """Labelled examples after each round: `initial`, …, `budget` (strictly increasing, `rounds` + 1 values)."""
        extra = self.budget - self.initial
        sizes = [self.initial]
        for r in range(1, self.rounds + 1):
            if self.growth == "linear":
                raw = self.initial + round(extra * r / self.rounds)
            else:
                raw = round(self.initial * (self.budget / self.initial) ** (r / self.rounds))
            # Rounding must not leave a round empty nor leave later rounds without an example each.
            sizes.append(min(max(raw, sizes[-1] + 1), self.budget - (self.rounds - r)))
        return sizes


class FinetuneConfig(Section):
    """Task fine-tuning with one strategy (full, a PEFT method, adapters, feature extraction, gradual unfreezing)."""

    enabled: bool = True
    task: str
    strategy: Literal[
        "full", "lora", "adalora", "gralora", "ia3", "adapters", "feature_extraction", "gradual_unfreezing"
    ] = "full"
    peft: dict[str, Any] = Field(default_factory=dict)
    adapter_reduction: PositiveInt = 16
    reinit_pooler: bool = True
    unfreeze_every: PositiveInt = 50
    layerwise_lr_decay: Annotated[float, Field(gt=0, le=1)] | None = None
    regularizer: RegularizerConfig | None = None
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: PositiveInt = 16
    grad_accum_steps: PositiveInt = 1
    epochs: PositiveFloat | None = 3
    max_steps: PositiveInt | None = None
    lr: PositiveFloat = 5e-5
    head_lr: PositiveFloat | None = None
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: PositiveFloat | None = 1.0
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    bf16: bool = False
    group_by_length: bool = True
    class_weights: Literal["none", "balanced"] = "none"
    sampler: Literal["random", "balanced"] = "random"
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    log_every: PositiveInt = 10
    eval_every: Annotated[int, Field(ge=0)] = 0
    early_stopping: EarlyStoppingConfig | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    select_seed: Literal["best"] | int = "best"

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FinetuneConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        if isinstance(self.select_seed, int) and self.select_seed not in self.seeds:
            raise ValueError(f"select_seed {self.select_seed} is not one of seeds {self.seeds}")
        return self


class DiscriminatorConfig(Section):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [100])
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    lr: PositiveFloat | None = 1e-3  # its own rate: at the encoder's rate it loses the game (see DESIGN.md)


class GuardConfig(Section):
    """Negative-transfer guard: keep the input checkpoint unless DANN beats a source-only run on the target."""

    enabled: bool = True
    tolerance: Annotated[float, Field(ge=0)] = 0.01


class AdaptConfig(Section):
    """Adversarial domain adaptation (DANN) from a labelled source task to unlabelled target text."""

    enabled: bool = True
    source_task: str
    target_corpus: str
    target_task: str | None = None  # labelled target data: its validation split is the guard's proxy
    strategy: Literal["full", "lora"] = "full"
    peft: dict[str, Any] = Field(default_factory=dict)
    schedule: Literal["ganin", "constant", "warm_start"] = "ganin"
    gamma: PositiveFloat = 10.0
    lambda_max: Annotated[float, Field(ge=0)] = 1.0  # 0: source-only training with a spectator discriminator
    warm_start: Annotated[float, Field(ge=0, lt=1)] = 0.1
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    freeze_layers: Annotated[int, Field(ge=0)] = 0
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: PositiveInt = 16
    max_steps: PositiveInt = 300
    lr: PositiveFloat = 3e-5
    head_lr: PositiveFloat | None = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_grad_norm: PositiveFloat | None = 1.0
    bf16: bool = False
    log_every: PositiveInt = 10
    eval_every: Annotated[int, Field(ge=0)] = 100
    max_eval_examples: PositiveInt = 1000
    guard: GuardConfig = GuardConfig()
    seed: int | None = None


# Tasks a text-only model cannot do, from the Self-Instruct paper's filter (whole words, case-insensitive).
FORBIDDEN_KEYWORDS = (
    "image",
    "images",
    "picture",
    "pictures",
    "graph",
    "graphs",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
)


class SelfInstructConfig(Section):
    """Self-Instruct (Wang et al. 2022) for decoders: the model grows an instruction dataset from the train
    split of `seed_task` (an sft task). Each round samples new instructions from a prompt listing
    `seed_examples` seed and `generated_examples` generated ones, keeps those that pass the length, keyword
    and ROUGE-L filters, and answers each with the fine-tuning prompt template (after `response_examples`
    seed demonstrations). Stops at `target_size` kept or `max_attempts` candidates, whichever comes first."""

    enabled: bool = True
    seed_task: str
    target_size: PositiveInt = 500
    max_attempts: PositiveInt | None = None  # candidate instructions sampled at most; default 20 × target_size
    batch_size: PositiveInt = 16  # prompts sampled per generate call (one round)
    header: str = "Come up with a series of tasks:"
    seed_examples: Annotated[int, Field(ge=0)] = 6
    generated_examples: Annotated[int, Field(ge=0)] = 2
    response_examples: Annotated[int, Field(ge=0)] = 2
    max_new_tokens: PositiveInt = 64  # per instruction (one line)
    response_max_new_tokens: PositiveInt = 256
    temperature: PositiveFloat = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.5
    max_rouge_l: Annotated[float, Field(gt=0, le=1)] = 0.7  # keep an instruction only below this with every other
    min_words: PositiveInt = 4
    max_words: PositiveInt = 150
    max_response_words: PositiveInt = 300
    forbidden_keywords: list[str] = Field(default_factory=lambda: list(FORBIDDEN_KEYWORDS))
    seed: int | None = None  # default: the recipe's seed

    @model_validator(mode="after")
    def _consistent(self) -> SelfInstructConfig:
        if self.seed_examples + self.generated_examples == 0:
            raise ValueError("seed_examples + generated_examples must be > 0: the model needs examples to continue")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if self.max_attempts is not None and self.max_attempts < self.target_size:
            raise ValueError(
                f"max_attempts ({self.max_attempts}) must be >= target_size ({self.target_size}); "
                "most candidates are filtered out, so allow several attempts per kept instruction"
            )
        if any(not keyword.strip() for keyword in self.forbidden_keywords):
            raise ValueError("forbidden_keywords must not contain empty strings (they would match everything)")
        return self

    @property
    def attempts_cap(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 20 * self.target_size


class NearDuplicatesConfig(Section):
    """Near-duplicate removal: MinHash LSH over word shingles of the normalised text (case and punctuation ignored).
    A document whose estimated Jaccard similarity to an earlier kept one is at least `threshold` is dropped, so
    the first document of each cluster stays."""

    threshold: Annotated[float, Field(gt=0, le=1)] = 0.8  # Jaccard similarity of the shingle sets
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128  # MinHash permutations: more = sharper estimate, slower
    shingle_words: Annotated[int, Field(ge=1, le=32)] = 5  # words per shingle (documents shorter: one shingle)


class DecontaminateConfig(Section):
    """Drop corpus documents that share a word n-gram with an evaluated task text (GPT-3's 13-gram rule), compared
    after NFKC, case-folding and turning punctuation into spaces. The flow passes the texts of every task split the
    recipe evaluates. An evaluation text shorter than `ngram` words must appear whole in a document (and a document
    shorter than `ngram` whole in an evaluation text); texts shorter than `min_ngram` words are not checked: that
    few words cannot tell a leak from a common phrase."""

    enabled: bool = True
    ngram: Annotated[int, Field(ge=1, le=64)] = 13
    min_ngram: Annotated[int, Field(ge=1, le=64)] = 8  # GPT-3 used 8 to 13 words

    @model_validator(mode="after")
    def _min_below_ngram(self) -> DecontaminateConfig:
        if self.min_ngram > self.ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be at most ngram ({self.ngram}); lower min_ngram")
        return self


class CurateConfig(Section):
    """Corpus curation before continued pretraining. Filters run in this order, each on what the previous kept:
    strip markup → drop boilerplate lines → length and quality rules → exact duplicates → near duplicates →
    decontamination against the evaluation sets. The rules are language-agnostic (Gopher-style ratios, no word
    lists; "words" are whitespace-separated). A null value turns its rule off."""

    enabled: bool = True
    corpus: str = "domain"  # the corpus to curate
    strip_markup: bool = True  # HTML/XML tags, comments, script/style blocks; entities decoded
    # A line found verbatim (whitespace aside) in at least this many multi-line documents, or this fraction of all
    # documents when below 1, is boilerplate (headers, footers, navigation) and is removed from every document.
    boilerplate_min_docs: int | float | None = 10
    min_words: PositiveInt = 20  # documents with fewer words are dropped
    max_words: PositiveInt | None = None
    min_alpha_word_ratio: Fraction | None = 0.8  # Gopher: share of words with at least one letter
    max_digit_ratio: Fraction | None = 0.25  # share of digits among non-space characters (tables, listings)
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] | None = 0.1  # Gopher: '#', '...' and '…' per word
    max_duplicate_line_ratio: Fraction | None = 0.3  # Gopher: share of a document's lines repeating an earlier one
    exact_duplicates: bool = True  # drop later copies of a document (compared after stripping whitespace)
    near_duplicates: NearDuplicatesConfig | None = NearDuplicatesConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()

    @model_validator(mode="after")
    def _consistent(self) -> CurateConfig:
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be at least min_words ({self.min_words})")
        value = self.boilerplate_min_docs
        if value is not None and not (0 < value < 1 or (value >= 2 and float(value).is_integer())):
            raise ValueError(
                f"boilerplate_min_docs must be a whole number of documents (at least 2) or a fraction of the corpus "
                f"between 0 and 1, got {value}; null turns boilerplate removal off"
            )
        return self


class StagesConfig(Section):
    """The build's stages, in the order they run; each one is optional."""

    curate: CurateConfig | None = None
    pretrain: PretrainConfig | None = None
    adapt: AdaptConfig | None = None
    self_instruct: SelfInstructConfig | None = None
    active_learning: ActiveLearningConfig | None = None
    finetune: FinetuneConfig | None = None


class RobustnessConfig(Section):
    """The fine-tuned model's task metric on the test set under seeded noise, and its drop from clean."""

    perturbations: list[Literal["typos", "casing", "punctuation", "word_dropout"]] = Field(
        default_factory=lambda: ["typos", "casing", "punctuation", "word_dropout"], min_length=1)
    rate: Annotated[float, Field(gt=0, le=1)] = 0.1  # fraction of words perturbed
    max_examples: PositiveInt = 500  # a seeded sample of the test set (clean and noisy share it)


class GatesConfig(Section):
    """Thresholds a build must meet to be promoted; unset gates are not checked. `metric` defaults to the
    task's primary metric (macro-F1 for classification, entity F1 for NER)."""

    metric: str | None = None
    min_task_metric: float | None = None  # test-set metric, mean over seeds, at least this
    max_general_perplexity_rise_pct: float | None = None  # general-text (pseudo-)perplexity rise, at most this
    general_corpus: str = "general"  # which evaluation corpus is "general text"
    max_robustness_drop: float | None = None  # worst metric drop under the robustness perturbations
    # The registry's current champion is scored on this build's test set; the build must beat it by this much
    # (the first build, with no champion yet, passes).
    min_gain_over_champion: float | None = None


class EvaluationConfig(Section):
    """Knowledge preservation: (pseudo-)perplexity of the base model and the build's language model on the
    validation split of each named corpus (masked LMs: pseudo-perplexity over `pseudo_perplexity_tokens`
    tokens, one forward pass each; causal LMs: perplexity over `max_blocks` blocks)."""

    enabled: bool = True
    corpora: list[str] = Field(default_factory=lambda: ["domain"])
    block_size: Annotated[int, Field(ge=8)] = 128
    max_blocks: PositiveInt = 64
    pseudo_perplexity_tokens: PositiveInt = 1024
    batch_size: PositiveInt = 16
    # The fine-tuned model (every seed): its task's test set, labelled out-of-distribution sets (tasks of the
    # same type and labels; their test split, else all of their data), and robustness to noise.
    ood_tasks: list[str] = Field(default_factory=list)
    robustness: RobustnessConfig | None = RobustnessConfig()
    gates: GatesConfig = GatesConfig()

    @model_validator(mode="after")
    def _gates_are_measured(self) -> EvaluationConfig:
        gates = self.gates
        if gates.max_general_perplexity_rise_pct is not None and gates.general_corpus not in self.corpora:
            raise ValueError(f"gates.max_general_perplexity_rise_pct reads corpus {gates.general_corpus!r}, which "
                             f"is not evaluated: add it to evaluation.corpora or set gates.general_corpus")
        if gates.max_robustness_drop is not None and self.robustness is None:
            raise ValueError("gates.max_robustness_drop needs evaluation.robustness (it is null)")
        return self


class RegistryConfig(Section):
    """The MLflow model registry: each finished build registers its final model as a new version with alias
    `challenger` (the selected fine-tuning seed, else the adapted classifier, else the language model)."""

    enabled: bool = True
    model_name: str | None = None  # default adaptflow-<domain>
    auto_promote: bool = False  # move `champion` to the new version when its gates passed


class ScheduleConfig(Section):
    """When a deployed recipe builds on its own (`adaptflow deploy`): a Prefect cron schedule."""

    cron: str  # "0 2 * * *": every night at 02:00
    timezone: str = "UTC"  # an IANA name, e.g. Europe/Berlin
    active: bool = True

    @model_validator(mode="after")
    def _valid(self) -> ScheduleConfig:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValueError as err:
            reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            raise ValueError(f"cron {self.cron!r} in timezone {self.timezone!r}: {reason}") from None
        return self


class TrackingConfig(Section):
    """MLflow. Default: SQLite + a local artifact folder under the recipe's workdir."""

    uri: str | None = None
    artifact_location: str | None = None
    experiment: str | None = None


class DistributedConfig(Section):
    """How training stages run: in this process, or launched on many processes, GPUs and nodes.

    `deepspeed` names a DeepSpeed JSON config (infra/deepspeed/zero2.json, zero3.json, zero3-offload.json);
    without one the ranks run plain torch. Micro-batch, accumulation and clipping always come from the
    stage, so the global batch is micro × accumulation × nnodes × nproc_per_node.
    """

    launcher: Literal["none", "torchrun", "deepspeed"] = "none"
    nnodes: PositiveInt = 1
    nproc_per_node: PositiveInt = 1
    node_rank: Annotated[int, Field(ge=0)] = 0  # torchrun: this node's rank (the deepspeed launcher uses ssh)
    rdzv_endpoint: str = "127.0.0.1:29500"  # host:port of node 0, reachable from every node
    hostfile: str | None = None  # deepspeed launcher: "host slots=N" lines (infra/hostfile.example)
    deepspeed: str | None = None
    timeout_minutes: PositiveInt = 720
    omp_num_threads: PositiveInt | None = None  # per rank; default: the cores divided by nproc_per_node

    @model_validator(mode="after")
    def _consistent(self) -> DistributedConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be below nnodes ({self.nnodes})")
        if self.launcher == "none" and (self.nnodes > 1 or self.nproc_per_node > 1):
            raise ValueError("nnodes/nproc_per_node above 1 need a launcher: set distributed.launcher=torchrun "
                             "or deepspeed")
        if self.launcher == "deepspeed" and self.nnodes > 1 and self.hostfile is None:
            raise ValueError("the deepspeed launcher reaches other nodes through a hostfile: set "
                             "distributed.hostfile (see infra/hostfile.example), or use launcher torchrun")
        if self.launcher == "deepspeed" and self.node_rank != 0:
            raise ValueError("the deepspeed launcher starts every node from node 0 (over ssh): leave node_rank 0")
        return self

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


# Corpus and task names become directory and S3 key components: plain names only, never a path.
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)]


class Recipe(Section):
    domain: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    description: str = ""
    seed: int = 0
    data_root: str | None = None
    workdir: str = "adaptflow-runs"
    checkpoint_mirror: str | None = None  # s3://bucket/prefix (or a path): resumable states copied there too
    model: ModelConfig
    corpora: dict[DatasetName, CorpusConfig] = Field(default_factory=dict)
    tasks: dict[DatasetName, TaskDataConfig] = Field(default_factory=dict)
    stages: StagesConfig = StagesConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig | None = None  # deployed builds run on it (adaptflow deploy)

    @model_validator(mode="after")
    def _evaluation_inputs_enabled(self) -> Recipe:
        """Gates and OOD sets that score the fine-tuned model need the fine-tuning stage (else they could only
        fail, after the whole build)."""
        evaluation, finetune = self.evaluation, self.stages.finetune
        if not evaluation.enabled or (finetune is not None and finetune.enabled):
            return self
        needs = [f"evaluation.gates.{name}" for name in ("min_task_metric", "max_robustness_drop",
                                                         "min_gain_over_champion")
                 if getattr(evaluation.gates, name) is not None]
        needs += ["evaluation.ood_tasks"] if evaluation.ood_tasks else []
        if needs:
            raise ValueError(f"{', '.join(needs)} score the fine-tuned model, but stages.finetune is disabled: "
                             "enable it, or remove them")
        return self

    @model_validator(mode="after")
    def _self_instruct_needs_a_decoder(self) -> Recipe:
        """Generation needs a causal LM; a model known to be an encoder is refused here (a `model.path` is checked
        by preflight, from its config.json)."""
        if self.enabled("self_instruct") is None:
            return self
        tiny = self.model.tiny
        if self.model.name == "minilm" or (tiny is not None and tiny.architecture == "bert"):
            raise ValueError("stages.self_instruct generates text with the model, which needs a decoder (causal LM); "
                             f"this recipe's model is an encoder ({self.model.name or 'tiny bert'}): use a decoder, "
                             "or disable stages.self_instruct")
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"adaptflow-{self.domain}"

    @property
    def registered_model_name(self) -> str:
        return self.registry.model_name or f"adaptflow-{self.domain}"

    def digest(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def enabled_stages(self) -> list[str]:
        return [name for name in StagesConfig.model_fields if self.enabled(name) is not None]

    def enabled(self, stage: str):
        """The config of `stage` when the recipe has it enabled, else None."""
        config = getattr(self.stages, stage)
        return config if config is not None and config.enabled else None

    def used_corpora(self) -> list[str]:
        """Names of the corpora that the enabled stages, the evaluation or the tokenizer read, in recipe order."""
        used = set()
        if (curate := self.enabled("curate")) is not None:
            used.add(curate.corpus)
        if self.model.tiny is not None:
            used.add(self.model.tiny.tokenizer_corpus)
        pretrain = self.stages.pretrain
        if pretrain is not None and pretrain.enabled:
            used.add(pretrain.corpus)
            if pretrain.replay is not None:
                used.add(pretrain.replay.corpus)
        adapt = self.stages.adapt
        if adapt is not None and adapt.enabled:
            used.add(adapt.target_corpus)
        finetune = self.stages.finetune
        if finetune is not None and finetune.enabled and finetune.regularizer is not None:
            used.add(finetune.regularizer.fisher_corpus)
        if self.evaluation.enabled:
            used.update(self.evaluation.corpora)
        return [name for name in self.corpora if name in used]

    def used_tasks(self) -> list[str]:
        used = set()  # active_learning.task and self_instruct.seed_task are the fine-tuned task (cross-checked)
        adapt, finetune = self.stages.adapt, self.stages.finetune
        if adapt is not None and adapt.enabled:
            used.update(t for t in (adapt.source_task, adapt.target_task) if t)
        if finetune is not None and finetune.enabled:
            used.add(finetune.task)
            if self.evaluation.enabled:
                used.update(self.evaluation.ood_tasks)
        return [name for name in self.tasks if name in used]

    def capped(self, *, max_steps: int | None = None, max_examples: int | None = None) -> Recipe:
        """A copy whose every stage runs at most `max_steps` and every corpus reads at most `max_examples`."""
        data = self.model_dump()
        if max_steps is not None:
            for stage in data["stages"].values():
                if stage and "max_steps" in stage:
                    stage["max_steps"] = min(stage["max_steps"] or max_steps, max_steps)
                    if "head_warmup_steps" in stage:
                        stage["head_warmup_steps"] = min(stage["head_warmup_steps"], stage["max_steps"] // 2)
        if max_examples is not None:
            for corpus in data["corpora"].values():
                corpus["max_documents"] = min(corpus["max_documents"] or max_examples, max_examples)
            for task in data["tasks"].values():
                task["max_examples"] = min(task["max_examples"] or max_examples, max_examples)
        return Recipe.model_validate(data)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe; raise `RecipeError` listing every problem at once."""
    path = Path(path)
    source = path.name
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(str(path), [f"file not found: {path} (recipes live in domains/, e.g. domains/tiny.yaml)"]) from None
    except yaml.YAMLError as err:
        raise RecipeError(source, [f"not valid YAML: {err}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"the top level must be a mapping of keys, got {type(raw).__name__}"])

    problems: list[str] = []
    overridden: set[str] = set()
    for item in overrides:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
        else:
            overridden.add(item.split("=", 1)[0].strip())

    _resolve_paths(raw, recipe_dir=path.resolve().parent)
    problems += _cross_reference_problems(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems += [_describe(e, overridden) for e in err.errors()]
        recipe = None
    if problems:
        raise RecipeError(source, _dedupe(problems))
    return recipe


def apply_override(raw: dict, item: str) -> str | None:
    """Apply one `a.b.c=value` override in place (value parsed as YAML); return a problem or None."""
    if "=" not in item:
        return f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.pretrain.lr=5e-5"
    key, text = (part.strip() for part in item.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        return f"--set {item!r}: empty key segment in {key!r}"
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return f"--set {item!r}: {where} is a {type(child).__name__}, not a section"
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text else None
    return None


def resolve_data_root(raw_root: str | None, recipe_dir: Path) -> Path:
    """Where relative corpus paths point.

    The recipe's `data_root` (relative to the recipe file), else $ADAPTFLOW_DATA_ROOT, else `../shared/data`
    seen from the working directory or, failing that, from the project whose `domains/` holds the recipe.
    """
    if raw_root:
        return (recipe_dir / os.path.expanduser(raw_root)).resolve()
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser().resolve()
    candidates = [Path.cwd() / DEFAULT_DATA_ROOT, recipe_dir.parent / DEFAULT_DATA_ROOT]
    return next((c.resolve() for c in candidates if c.is_dir()), candidates[0].resolve())


def _resolve_paths(raw: dict, recipe_dir: Path) -> None:
    """Turn relative data paths into absolute ones so that stages never depend on the working directory."""
    root = resolve_data_root(raw.get("data_root"), recipe_dir)

    def resolve(p):
        if isinstance(p, list):
            return [resolve(item) for item in p]
        if not isinstance(p, str):
            return p
        p = os.path.expanduser(p)
        return p if p.startswith("s3://") or os.path.isabs(p) else str(root / p)

    for section, keys in (("corpora", ("path",)), ("tasks", ("train", "validation", "test"))):
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        for entry in entries.values():
            if isinstance(entry, dict):
                for key in keys:
                    if key in entry:
                        entry[key] = resolve(entry[key])
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = str((recipe_dir / os.path.expanduser(model["path"])).resolve())


def _cross_reference_problems(raw: dict) -> list[str]:
    """Names that must refer to a declared corpus or task. Checked on the raw data so they join the schema's
    errors in one report."""
    corpora = raw.get("corpora") if isinstance(raw.get("corpora"), dict) else {}
    known = ", ".join(sorted(corpora)) or "none declared"
    refs: list[tuple[str, Any]] = []
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("tiny"), dict):
        refs.append(("model.tiny.tokenizer_corpus", model["tiny"].get("tokenizer_corpus", "domain")))
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    pretrain = stages.get("pretrain")
    if isinstance(pretrain, dict) and pretrain.get("enabled", True):
        refs.append(("stages.pretrain.corpus", pretrain.get("corpus", "domain")))
        if isinstance(pretrain.get("replay"), dict):
            refs.append(("stages.pretrain.replay.corpus", pretrain["replay"].get("corpus")))
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    declared_tasks = ", ".join(sorted(tasks)) or "none declared"
    task_refs: list[tuple[str, Any]] = []
    task_problems_extra: list[str] = []
    adapt = stages.get("adapt")
    if isinstance(adapt, dict) and adapt.get("enabled", True):
        task_refs += [("stages.adapt.source_task", adapt.get("source_task")),
                      ("stages.adapt.target_task", adapt.get("target_task"))]
        refs.append(("stages.adapt.target_corpus", adapt.get("target_corpus")))
    curate = stages.get("curate")
    if isinstance(curate, dict) and curate.get("enabled", True):
        refs.append(("stages.curate.corpus", curate.get("corpus", "domain")))
    finetune = stages.get("finetune")
    finetuned = finetune.get("task") if isinstance(finetune, dict) and finetune.get("enabled", True) else None
    for stage, key, kind in (("self_instruct", "seed_task", "sft"), ("active_learning", "task", "classification")):
        config = stages.get(stage)
        if not isinstance(config, dict) or not config.get("enabled", True):
            continue
        name = config.get(key)
        task_refs.append((f"stages.{stage}.{key}", name))
        declared = tasks.get(name) if isinstance(name, str) else None
        if isinstance(declared, dict) and declared.get("type") != kind:
            task_problems_extra.append(f"stages.{stage}.{key}: {name!r} is a {declared.get('type')} task; "
                                       f"{stage} works on {kind} tasks")
        if isinstance(name, str) and name != finetuned:
            task_problems_extra.append(
                f"stages.{stage}.{key}: {name!r} must be the task stages.finetune trains on "
                f"({finetuned or 'fine-tuning is disabled'}): {stage} makes that task's training split")
    if isinstance(finetune, dict) and finetune.get("enabled", True):
        task_refs.append(("stages.finetune.task", finetune.get("task")))
        regularizer = finetune.get("regularizer")
        if isinstance(regularizer, dict) and regularizer.get("fisher_corpus", "task") != "task":
            refs.append(("stages.finetune.regularizer.fisher_corpus", regularizer["fisher_corpus"]))
    evaluation = raw.get("evaluation") if isinstance(raw.get("evaluation"), dict) else {}
    names = evaluation.get("corpora", ["domain"])
    if isinstance(names, list) and evaluation.get("enabled", True):
        refs += [(f"evaluation.corpora[{i}]", name) for i, name in enumerate(names)]
    ood = evaluation.get("ood_tasks", [])
    if isinstance(ood, list) and evaluation.get("enabled", True):
        task_refs += [(f"evaluation.ood_tasks[{i}]", name) for i, name in enumerate(ood)]
        main = tasks.get(finetune.get("task")) if isinstance(finetune, dict) else None
        for name in ood:
            other = tasks.get(name) if isinstance(name, str) else None
            if isinstance(main, dict) and isinstance(other, dict) and other.get("type") != main.get("type"):
                task_problems_extra.append(
                    f"evaluation.ood_tasks: {name!r} is a {other.get('type')} task but the fine-tuned model "
                    f"solves {main.get('type')} ({finetune.get('task')!r}); list tasks of the same type")
    task_problems = [
        f"{where}: {name!r} is not a declared task (declared: {declared_tasks}); add it under tasks: or fix the name"
        for where, name in task_refs
        if isinstance(name, str) and name not in tasks
    ]
    return task_problems + task_problems_extra + [
        f"{where}: {name!r} is not a declared corpus (declared: {known}); add it under corpora: or fix the name"
        for where, name in refs
        if isinstance(name, str) and name not in corpora
    ]


def _describe(error: dict, overridden: set[str]) -> str:
    where = _dotted(error["loc"])
    origin = " (from --set)" if any(k == where or k.startswith(f"{where}.") for k in overridden) else ""
    if error["type"] == "extra_forbidden":
        parent = _section_at(error["loc"][:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(error["loc"][-1]), list(parent.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(parent.model_fields)}"
        return f"{where}: unknown key{origin}{hint}"
    if error["type"] == "missing":
        return f"{where}: required but missing"
    if error["loc"] and error["loc"][-1] == "[key]":  # a corpus or task name
        section = _dotted(error["loc"][:-2])
        return (f"{section}: name {error['input']!r} must start with a letter or digit and hold only letters, "
                f"digits, '_' or '-' (at most 64): it names files and S3 keys{origin}")
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    got = "" if isinstance(value, dict) else f" (got {value!r})"  # a section's own check names its keys itself
    return f"{where or '(top level)'}: {message}{got}{origin}"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the keys at `loc`, for did-you-mean hints."""
    model: type[BaseModel] | None = Recipe
    parts = list(loc)
    while parts and model is not None:
        part = parts.pop(0)
        if model is Recipe and part == "corpora":
            if not parts:
                return None  # corpus names are the user's own
            parts.pop(0)
            model = CorpusConfig
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _unwrap_model(field.annotation) if field else None
    return model


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
