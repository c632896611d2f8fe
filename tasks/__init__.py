"""Prefect tasks: one small file per stage. Each builds the stage's `Inputs` from the references it is given,
runs it through `stage_runs.stage_run` (MLflow child run, reuse by cache key, in this process or on the recipe's
ranks) and returns references. `context` holds what every task of a build shares; `retries` which failures are
retried (only transient ones: network, S3, the tracking server)."""
