"""Self-Instruct for decoders: the model (after pretraining and adaptation) grows the seed task's instruction set
(`adaptflow.data.selfinstruct`); fine-tuning then trains on the seeds plus what survived the filters, each row with
its origin.

    self_instruct.run(Config(...), Inputs(model=..., seeds=..., prompt_template=...), env) -> Result
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptflow.data.labelled import load_records
from adaptflow.data.selfinstruct import REASONS, SelfInstructConfig, generate_instructions, write_instructions
from adaptflow.lineage import stage_cache_key
from adaptflow.models.checkpoints import load_model
from adaptflow.refs import CheckpointRef, DatasetRef, Record
from adaptflow.stages.contract import StageEnv

NAME = "self_instruct"
DISTRIBUTED = False
REUSABLE = False
Config = SelfInstructConfig


@dataclass(frozen=True)
class Inputs(Record):
    model: CheckpointRef  # the decoder that writes the instructions
    seeds: DatasetRef  # the seed task's train split (an sft task)
    prompt_template: str  # stages.finetune's: the answers are written in the format SFT trains on
    name: str = "self-instruct"  # the written dataset's name


@dataclass(frozen=True)
class Result(Record):
    train: DatasetRef  # the seeds, then the kept generated rows, with their provenance columns
    seeds: int
    attempts: int
    rounds: int
    rejected: dict[str, int]  # candidates dropped, per reason (adaptflow.data.selfinstruct.REASONS)
    stopped: str  # "target_size", or "max_attempts" when the cap ran out first
    rows: tuple[dict, ...]  # the generated rows alone

    @property
    def kept(self) -> int:
        return len(self.rows)


def cache_key(config: Config, inputs: Inputs, seed: int) -> str:
    return stage_cache_key(NAME, config.model_dump(mode="json"), inputs, _seed(config, seed))


def run(config: Config, inputs: Inputs, env: StageEnv) -> Result:
    seed = _seed(config, env.seed)
    seeds = load_records(inputs.seeds)
    generator, tokenizer = load_model(inputs.model, "clm", seed=seed, trust_remote_code=env.trust_remote_code)
    result = generate_instructions(generator, tokenizer, seeds, config, template=inputs.prompt_template, seed=seed,
                                   model_digest=inputs.model.digest)
    train = write_instructions(result, name=inputs.name, out_dir=env.datasets_dir, seeds=seeds)
    return Result(train=train, seeds=len(seeds), attempts=result.attempts, rounds=result.rounds,
                  rejected={reason: result.rejected.get(reason, 0) for reason in REASONS}, stopped=result.stopped,
                  rows=result.rows)


def _seed(config: Config, seed: int) -> int:
    return config.seed if config.seed is not None else seed


def check_recipe(recipe) -> None:
    """Generation needs a causal LM; a model known to be an encoder is refused here (a `model.path` is checked
    by preflight, from its config.json)."""
    tiny = recipe.model.tiny
    if recipe.model.name == "minilm" or (tiny is not None and tiny.architecture == "bert"):
        raise ValueError("stages.self_instruct generates text with the model, which needs a decoder (causal LM); "
                         f"this recipe's model is an encoder ({recipe.model.name or 'tiny bert'}): use a decoder, "
                         "or disable stages.self_instruct")
