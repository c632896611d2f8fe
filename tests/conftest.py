"""Shared fixtures: the real data folder, shrunken shipped recipes, and one Prefect test server per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3"]

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ROOT / "domains"
DATA_ROOT = (ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _quiet_offline_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")
    os.environ["ADAPTFLOW_DATA_ROOT"] = str(DATA_ROOT)
    # Prefect configures logging (dictConfig) when prefect.main is first imported, which closes every handler
    # alive by then: absl's (rouge-score imports absl) then closes the stream it captured at import — pytest's
    # capture stream, whenever a CliRunner had swapped sys.stderr at that moment. Configure logging first.
    import prefect.main  # noqa: F401

    yield


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's test harness (a real temporary API on SQLite), started once: it takes 10–20 s here."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """Shrink domains/tiny.yaml further for unit-speed runs, with everything written under tmp_path."""
    return [
        f"workdir={tmp_path / 'runs'}",
        "corpora.domain.max_documents=80",
        "corpora.general.max_documents=200",
        "stages.pretrain.max_steps=16",
        "stages.pretrain.eval_every=8",
        "stages.pretrain.log_every=2",
    ]


@pytest.fixture(scope="session")
def abstracts() -> list[str]:
    from adaptflow.data.corpus import read_texts

    return read_texts(str(DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"), max_rows=120)


def build_tiny(architecture: str, texts: list[str], **sizes):
    """(model, tokenizer) through the production builders: 2 layers, hidden 32, tokenizer trained here."""
    from adaptflow.config import TinyModelConfig
    from adaptflow.models import build_tiny_model, train_tokenizer

    tiny = TinyModelConfig(**{"architecture": architecture, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                              "intermediate_size": 64, "max_position_embeddings": 128, "vocab_size": 600} | sizes)
    tokenizer = train_tokenizer(texts, tiny)
    return build_tiny_model(tiny, tokenizer, seed=0), tokenizer


@pytest.fixture(scope="session")
def tiny_bert(abstracts):
    return build_tiny("bert", abstracts)


@pytest.fixture(scope="session")
def tiny_gpt2(abstracts):
    return build_tiny("gpt2", abstracts)


def pack_texts(texts: list[str], tokenizer, objective: str, block_size: int, folder, *, isolate: bool = False,
               shard_bytes: int | None = None):
    """`texts` as PackedBlocks through the production path: a written split, the token store under `folder`."""
    from adaptflow.data import blocks
    from adaptflow.data.tokens import SHARD_TEXT_BYTES, TokenStore

    store = TokenStore(Path(folder) / "tokens", shard_bytes=shard_bytes or SHARD_TEXT_BYTES)
    return blocks.pack_texts(texts, tokenizer, objective, block_size, datasets_dir=Path(folder) / "datasets",
                             store=store, isolate_documents=isolate)
