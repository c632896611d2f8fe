"""Which failures of a build step are retried: transient ones only — S3 or the tracking server unreachable,
timing out or answering 5xx — never a config error, a data error or an out-of-memory."""

from __future__ import annotations

from adaptflow.storage import StorageUnavailable

RETRIES = 2
RETRY_DELAYS = [5, 30]


def is_transient(error: BaseException | None) -> bool:
    """Network-ish failures worth a retry, found anywhere in the error's cause chain."""
    from mlflow.exceptions import RestException
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout as RequestsTimeout

    from adaptflow.errors import AdaptflowError

    transient: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, StorageUnavailable,
                                                  RequestsConnectionError, RequestsTimeout)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError

        transient += (BotoConnectionError,)
    except ImportError:
        pass
    if error is None or isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return False
    if isinstance(error, AdaptflowError) and not isinstance(error, StorageUnavailable):
        return False  # the user's to fix: retrying cannot help
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, transient):
            return True
        if isinstance(error, RestException) and str(error.error_code) in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR"}:
            return True  # the tracking server answered 503 / 500
        error = error.__cause__ or error.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the task failed on a transient error."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


def stage_task(name: str, **options):
    """`@task` for a build step: retried only on transient errors (twice, after 5 s then 30 s); never cached by
    Prefect, since adaptflow reuses finished stages itself, by cache key (`stage_runs.stage_run`)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name=name, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
                cache_policy=NO_CACHE, **options)
