"""Tokenise the build's corpora into the token store before any stage reads them: one mapped Prefect task per
shard, in a subflow whose task runner the recipe picks (`tokens.runner`: threads here, or Dask — a local cluster
or a scheduler whose workers may be other machines). A corpus already in the store costs nothing."""

from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from adaptflow.config.sections import TokensConfig
from adaptflow.data import tokens
from adaptflow.data.tokens import ShardTask, TokenStore
from adaptflow.errors import ConfigError
from adaptflow.models.checkpoints import infer_objective, load_tokenizer
from adaptflow.refs import CheckpointRef, DatasetRef
from adaptflow.tasks.context import BuildContext
from adaptflow.tasks.prepare import PreparedInputs
from adaptflow.tasks.retries import RETRIES, RETRY_DELAYS, retry_transient, stage_task


@task(name="tokenize-shard", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def tokenize_shard(shard: ShardTask, tokenizer_uri: str) -> dict:
    return tokens.tokenize_shard(shard, load_tokenizer(tokenizer_uri))


@flow(name="tokenize")
def tokenize_splits(store_root: str, splits: list[DatasetRef], tokenizer_uri: str, objective: str,
                    shard_bytes: int = tokens.SHARD_TEXT_BYTES) -> list[str]:
    """Every split in the store (tokenising only the shards it lacks); returns their store keys."""
    store, tokenizer = TokenStore(store_root, shard_bytes=shard_bytes), load_tokenizer(tokenizer_uri)
    keys = []
    for split in splits:
        key, shards = store.plan(split, tokenizer, objective)
        if shards:
            written = tokenize_shard.map(shards, unmapped(tokenizer_uri)).result()
            store.commit(key, split, tokenizer, objective, written)
        keys.append(key)
    return keys


def task_runner(config: TokensConfig):
    if config.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ConfigError("tokens.runner: dask needs prefect-dask: pip install 'adaptflow[dask]'") from exc

        if config.address:
            return DaskTaskRunner(address=config.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=config.workers)


def token_splits(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> tuple[str, list[DatasetRef]]:
    """The language-modelling objective and the splits read as blocks: pretraining's corpus (and replay), and the
    corpora whose perplexity evaluation compares."""
    recipe = ctx.recipe
    pretrain = recipe.enabled("pretrain")
    objective = pretrain.objective if pretrain is not None and pretrain.objective != "auto" else infer_objective(
        base.uri)
    splits = []
    if pretrain is not None:
        corpus = data.corpora[pretrain.corpus]
        splits += [corpus.train, corpus.validation]
        if pretrain.replay is not None:
            splits.append(data.corpora[pretrain.replay.corpus].train)
    if recipe.enabled("evaluate") is not None:
        splits += [data.corpora[name].validation for name in recipe.evaluation.corpora]
    unique = {split.digest: split for split in splits if split.rows}
    return objective, list(unique.values())


@stage_task("tokenize")
def tokenize(ctx: BuildContext, base: CheckpointRef, data: PreparedInputs) -> list[str]:
    objective, splits = token_splits(ctx, base, data)
    if not splits:
        return []
    subflow = tokenize_splits.with_options(task_runner=task_runner(ctx.recipe.tokens))
    return subflow(ctx.cache_dir, splits, base.uri, objective, shard_bytes=ctx.recipe.tokens.shard_mb << 20)
