"""The rank entry point of a launched stage: every rank runs

    python -m adaptflow.stages SPEC.json

on the spec `adaptflow.launch.launch_stage` wrote. It imports the stage's module, rebuilds its `Config`,
`Inputs` and `StageEnv` from the spec, joins the process group and calls `run`; rank 0 writes the `Result`
(and the world size) where the caller waits for it, and logs metrics to the caller's MLflow run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

from adaptflow.stages.contract import StageEnv, check_stage
from adaptflow.train.runtime import Runtime


def main(spec_path: str) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    if "TORCHELASTIC_ERROR_FILE" not in os.environ and os.environ.get("ADAPTFLOW_ERROR_DIR"):
        # Not under torchrun (the deepspeed launcher): `record` writes to a file of ours instead.
        Path(os.environ["ADAPTFLOW_ERROR_DIR"]).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHELASTIC_ERROR_FILE"] = str(Path(os.environ["ADAPTFLOW_ERROR_DIR"]) /
                                                    f"rank{os.environ.get('RANK', '0')}.json")

    @record  # writes this rank's exception where the launcher collects it (torchrun: error.json)
    def run() -> None:
        spec = json.loads(Path(spec_path).read_text())
        runtime = Runtime.from_env()
        logging.basicConfig(level=logging.INFO, format=f"[rank {runtime.rank}] %(levelname)s %(name)s: %(message)s")
        stage = check_stage(importlib.import_module(spec["module"]))
        log_metrics = None
        if runtime.is_main and spec.get("tracking"):
            from mlflow import MlflowClient

            from adaptflow.tracking.runs import metrics_logger

            log_metrics = metrics_logger(MlflowClient(spec["tracking"]["uri"]), spec["tracking"]["run_id"])
        config = stage.Config.model_validate(spec["config"])
        inputs = stage.Inputs.from_dict(spec["inputs"])
        env = StageEnv.from_dict(spec["env"]).on_rank(runtime, log_metrics)
        result = stage.run(config, inputs, env)
        if runtime.is_main:
            target = Path(spec["result"])
            temporary = target.with_suffix(".tmp")
            temporary.write_text(json.dumps({"result": result.to_dict(), "world_size": runtime.world_size}))
            temporary.replace(target)
        runtime.exit()

    run()


if __name__ == "__main__":
    main(sys.argv[1])
