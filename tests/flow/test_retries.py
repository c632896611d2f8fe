"""Retries: transient failures (S3, the tracking server) are retried, a user's error or an out-of-memory never is."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from prefect import flow

from adaptflow.errors import ConfigError, DataError
from adaptflow.storage import StorageUnavailable
from adaptflow.tasks.retries import RETRIES, is_transient, retry_transient, stage_task
from adaptflow.train.runtime import free_port


def _raised(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as outer:
        return outer


def test_unreachable_services_are_transient_and_user_errors_are_not(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(MlflowException) as down:  # a real client against a port nothing listens on
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_run("0" * 32)
    assert is_transient(down.value)

    assert is_transient(StorageUnavailable("s3://b/k: endpoint unreachable"))
    assert is_transient(TimeoutError("read timed out"))
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "503"}))
    assert is_transient(_raised(RuntimeError("upload failed"), ConnectionResetError("peer reset")))

    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not is_transient(ConfigError("block_size exceeds the model's positions"))
    assert not is_transient(DataError("s3://b/k does not exist"))
    assert not is_transient(_raised(ConfigError("bad endpoint in recipe"), ConnectionError("refused")))
    assert not is_transient(MemoryError())
    assert not is_transient(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_transient(ValueError("shapes do not match"))
    assert not is_transient(None)


def test_a_stage_task_is_retried_on_a_transient_failure_only(prefect_server):
    attempts = {"transient": 0, "config": 0}

    @stage_task("flaky")
    def flaky(kind: str) -> str:
        attempts[kind] += 1
        if kind == "transient" and attempts[kind] == 1:
            raise StorageUnavailable("s3://bucket/key: endpoint unreachable (simulated outage)")
        if kind == "config":
            raise ConfigError("stages.pretrain.lr must be > 0")
        return "done"

    quick = flaky.with_options(retry_delay_seconds=0)

    @flow
    def build(kind: str) -> str:
        return quick(kind)

    assert build("transient") == "done" and attempts["transient"] == 2
    with pytest.raises(ConfigError):
        build("config")
    assert attempts["config"] == 1


def test_every_task_of_the_build_flow_retries_transient_failures_only():
    from adaptflow.tasks.adapt import adapt
    from adaptflow.tasks.evaluate import evaluate
    from adaptflow.tasks.finetune import finetune, select_seed
    from adaptflow.tasks.prepare import prepare_data, prepare_model
    from adaptflow.tasks.pretrain import pretrain
    from adaptflow.tasks.register import register

    for task in (prepare_data, prepare_model, pretrain, adapt, finetune, select_seed, evaluate, register):
        assert task.retries == RETRIES and task.retry_condition_fn is retry_transient, task.name
        assert list(task.retry_delay_seconds) == [5, 30], task.name
