"""Recipe sections shared by the whole build: the base model, corpora, labelled tasks, how training is laid out
on ranks, tracking, registration and the schedule. Each stage's own section is its module's `Config`
(`adaptflow.stages.<name>`); `adaptflow.recipe` puts them together."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from adaptflow.config.base import CorpusName, Fraction, NonNegativeInt, PositiveInt, Section, one_of


class TinyModelConfig(Section):
    """A small model built from config (tests, smoke runs), with a tokenizer trained locally."""

    architecture: Literal["bert", "gpt2", "llama"] = "bert"
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 128
    max_position_embeddings: PositiveInt = 512
    vocab_size: Annotated[int, Field(ge=100)] = 2000
    tokenizer_corpus: CorpusName = "domain"

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

    `type` is a task kind (`adaptflow.kinds`): `classification` (single label per text, optional text pair),
    `ner` (IOB2 tags per token, from CoNLL-style files) or `sft` (prompt → response pairs for decoders). Each
    split is one path or a list of paths (concatenated). Without `validation`, `validation_fraction` of train is
    held out; without `test`, `test_fraction` of it is (both by a hash of each record, so a record's side never
    depends on the others; e.g. 0.2 and 0.7 leave a tenth of a labelled file to train on).
    """

    type: str
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
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_examples: PositiveInt | None = None

    @model_validator(mode="after")
    def _something_left_to_train_on(self) -> TaskDataConfig:
        held = (self.validation_fraction if self.validation is None else 0) + (self.test_fraction if self.test is None
                                                                                  else 0)
        if held >= 1:
            raise ValueError(f"validation_fraction + test_fraction ({held:g}) must leave part of train to train on")
        return self

    @field_validator("type")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from adaptflow.kinds import KINDS

        return one_of(value, KINDS)


class DistributedConfig(Section):
    """How training stages run: in this process, or launched on many processes, GPUs and nodes.

    `deepspeed` names a DeepSpeed JSON config (infra/deepspeed/zero2.json, zero3.json, zero3-offload.json);
    without one the ranks run plain torch. Micro-batch, accumulation and clipping always come from the
    stage, so the global batch is micro × accumulation × nnodes × nproc_per_node.
    """

    launcher: Literal["none", "torchrun", "deepspeed"] = "none"
    nnodes: PositiveInt = 1
    nproc_per_node: PositiveInt = 1
    node_rank: NonNegativeInt = 0  # torchrun: this node's rank (the deepspeed launcher uses ssh)
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


class TokensConfig(Section):
    """Where tokenised corpora live and what tokenises them. `store`: a folder or an s3:// prefix (default:
    `<workdir>/cache/tokens`), shared by every build that points at it. Shards are tokenised as mapped Prefect
    tasks: `runner: threads` (this machine; each shard also spreads over the cores inside the tokenizer) or
    `dask` — a local Dask cluster of `workers` processes, or the scheduler at `address` (`tcp://host:8786`),
    whose workers may be other machines that see the same `store`. `shard_mb`: text per shard."""

    store: str | None = None
    shard_mb: Annotated[int, Field(ge=1, le=1024)] = 128
    runner: Literal["threads", "dask"] = "threads"
    workers: PositiveInt = 2
    address: str | None = None


class TrackingConfig(Section):
    """MLflow. Default: SQLite + a local artifact folder under the recipe's workdir."""

    uri: str | None = None
    artifact_location: str | None = None
    experiment: str | None = None


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
        # croniter is what Prefect validates cron strings with (it vendors a copy); the engine needs no Prefect.
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from croniter import croniter

        reason = None
        if not croniter.is_valid(self.cron):
            reason = f'Invalid cron string: "{self.cron}"'
        elif any(part.casefold() in ("r", "h") for part in self.cron.split()):
            reason = f'Random and Hashed expressions are unsupported, received: "{self.cron}"'
        else:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                reason = f'Invalid timezone: "{self.timezone}" (specify in IANA tzdata format, for example, ' \
                         'America/New_York)'
        if reason:
            raise ValueError(f"cron {self.cron!r} in timezone {self.timezone!r}: {reason}")
        return self

