"""The promote flow: move a registered model's `champion` alias under the same rules as `adaptflow promote`,
as a Prefect flow (schedulable, visible in the UI, e.g. after a nightly build's review window).

    MLFLOW_TRACKING_URI=... python -m adaptflow.flows.promote adaptflow-biomedical [VERSION]
"""

from __future__ import annotations

import sys

from prefect import flow

from adaptflow.tracking import registry


@flow(name="promote", flow_run_name="promote-{model}")
def promote(model: str, tracking_uri: str, version: str | None = None, rollback: bool = False,
            force: bool = False, reason: str | None = None) -> dict:
    """The audit record of the decision; a refusal fails the flow run with its reason (and is recorded)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if rollback:
        return registry.rollback(client, model, reason=reason, user="prefect")
    return registry.promote(client, model, version=version, force=force, reason=reason, user="prefect")


if __name__ == "__main__":
    import os

    print(promote(sys.argv[1], os.environ["MLFLOW_TRACKING_URI"], *sys.argv[2:3]))
