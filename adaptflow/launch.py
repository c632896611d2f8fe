"""Running a stage here or on many processes: the caller's side of the launcher.

    run_stage(pretrain, config, inputs, env, distributed=recipe.distributed, job_dir=...)   # from a Prefect task
    python -m adaptflow.stages SPEC.json                                                  # what each rank runs

`run_stage` calls the stage in this process, or — when the recipe has a launcher and the stage runs on ranks
(`DISTRIBUTED`) — `launch_stage`: it writes a spec (the stage's module, its config, inputs and environment as
JSON, the MLflow run to log to, where the result goes) and starts `torchrun` or the deepspeed launcher on it.
Nothing here knows any particular stage. Rank 0's output is streamed to the caller's log; every rank's output is
kept under the job's `logs/`. A rank that fails (an exception, a signal, the timeout) fails the stage with that
rank's last lines in the message, and the other ranks are stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from adaptflow.config.sections import DistributedConfig
from adaptflow.errors import AdaptflowError
from adaptflow.refs import Record
from adaptflow.stages.contract import StageEnv
from adaptflow.train.runtime import free_port

log = logging.getLogger(__name__)


class StageFailed(AdaptflowError, RuntimeError):
    """A launched stage exited with an error, a signal or the timeout."""


STOP_FILE = "agents.stop"


@dataclass(frozen=True)
class Ran:
    """A stage's result and the number of ranks that computed it."""

    result: Record
    world_size: int = 1


def run_stage(stage: ModuleType, config, inputs: Record, env: StageEnv, *, distributed: DistributedConfig | None = None,
              job_dir: Path | None = None, tracking: dict | None = None) -> Ran:
    """`stage.run(config, inputs, env)` in this process, or on the ranks of `distributed` when it names a launcher
    and the stage runs on ranks (`stage.DISTRIBUTED`); `job_dir` holds the launch's spec, result and logs."""
    if distributed is None or distributed.launcher == "none" or not stage.DISTRIBUTED:
        return Ran(stage.run(config, inputs, env))
    if job_dir is None:
        raise ValueError(f"launching stage {stage.NAME} needs a job_dir for its spec, result and logs")
    return launch_stage(stage, config, inputs, env, distributed=distributed, job_dir=job_dir, tracking=tracking)


def launch_stage(stage: ModuleType, config, inputs: Record, env: StageEnv, *, distributed: DistributedConfig,
                 job_dir: Path, tracking: dict | None = None) -> Ran | None:
    """Run `stage` on the launcher's ranks; return rank 0's result and the world size.

    `tracking` ({"uri", "run_id"}) is the MLflow run rank 0 logs metrics to. With several nodes under torchrun,
    node 0 calls this and every other node runs `join_launches` (the `adaptflow node` command) on the same
    shared workdir: it finds the spec written here and starts that node's ranks. Only node 0 gets the result.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "result.json").unlink(missing_ok=True)
    spec = {"stage": stage.NAME, "module": stage.__name__, "launch_id": uuid.uuid4().hex,
            "distributed": distributed.model_dump(mode="json"), "config": config.model_dump(mode="json"),
            "inputs": inputs.to_dict(), "env": env.to_dict(), "tracking": tracking,
            "result": str(job_dir / "result.json")}
    spec_path = job_dir / "spec.json"
    temporary = spec_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(spec, indent=2))
    temporary.replace(spec_path)  # a node agent never reads half a spec
    ran = run_spec(spec_path, distributed)
    if ran is None:
        return None
    return Ran(stage.Result.from_dict(ran["result"]), ran["world_size"])


def run_spec(spec_path: Path, distributed: DistributedConfig) -> dict | None:
    """Start this node's ranks on a written spec; wait; rank 0's result on node 0, None on the others."""
    job_dir = spec_path.parent
    stage = json.loads(spec_path.read_text())["stage"]
    result_path = job_dir / "result.json"
    logs = job_dir / "logs" if distributed.node_rank == 0 else job_dir / f"logs-node{distributed.node_rank}"
    errors = job_dir / "errors"  # the deepspeed launcher's ranks write their exceptions here
    if distributed.node_rank == 0:
        shutil.rmtree(errors, ignore_errors=True)
    if distributed.launcher == "deepspeed":
        command = deepspeed_command(distributed, spec_path)
    else:
        command = torchrun_command(distributed, spec_path, logs)
    log.info("launching %s on %d node(s) × %d process(es): %s", stage, distributed.nnodes,
             distributed.nproc_per_node, " ".join(command))
    env = _rank_environment(distributed) | {"ADAPTFLOW_ERROR_DIR": str(errors)}
    returncode, tail = _run(command, env, timeout=distributed.timeout_minutes * 60)
    if returncode != 0:
        raise StageFailed(_failure_message(stage, returncode, logs, tail, errors))
    if distributed.node_rank != 0:
        return None
    if not result_path.is_file():
        raise StageFailed(f"stage {stage} exited cleanly but rank 0 wrote no result at {result_path}")
    return json.loads(result_path.read_text())


def join_launches(workdir: Path, node_rank: int, *, idle_minutes: float = 60, poll_seconds: float = 2,
                  recent_minutes: float = 10) -> int:
    """Node agent of node `node_rank` > 0: start this node's ranks for every multi-node stage that node 0
    launches under `workdir` (shared by all nodes), one after another; return how many it joined.

    A spec counts when it was written in the last `recent_minutes` (torchrun's rendezvous waits about that
    long for the other nodes) and not joined yet. The agent stops when `launch/agents.stop` is touched after
    it started (node 0's job script does so when the build ends), or after `idle_minutes` without a new
    stage. A stage failing here is logged and left to node 0, whose task reports it.
    """
    if node_rank < 1:
        raise ValueError("node 0 runs the build itself; agents are nodes 1 … nnodes-1")
    joined: set[str] = set()
    started = time.time()
    stop = Path(workdir) / "launch" / STOP_FILE
    idle_since = time.monotonic()
    log.info("node %d: watching %s for multi-node stages", node_rank, Path(workdir) / "launch")
    while time.monotonic() - idle_since < idle_minutes * 60:
        if stop.is_file() and stop.stat().st_mtime >= started:
            break
        for spec_path in sorted(Path(workdir).glob("launch/*/spec.json")):
            try:
                spec = json.loads(spec_path.read_text())
                distributed = DistributedConfig(**spec["distributed"])
            except (OSError, ValueError, KeyError):
                continue
            fresh = time.time() - spec_path.stat().st_mtime < recent_minutes * 60
            if spec["launch_id"] in joined or not fresh or distributed.launcher != "torchrun" \
                    or node_rank >= distributed.nnodes:
                continue
            joined.add(spec["launch_id"])
            try:
                run_spec(spec_path, distributed.model_copy(update={"node_rank": node_rank}))
                log.info("node %d: stage %s done", node_rank, spec["stage"])
            except StageFailed as err:
                log.error("node %d: %s", node_rank, err)
            idle_since = time.monotonic()
        time.sleep(poll_seconds)
    return len(joined)


def torchrun_command(distributed: DistributedConfig, spec_path: Path, log_dir: Path) -> list[str]:
    host, _, port = distributed.rdzv_endpoint.rpartition(":")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={distributed.nnodes}", f"--nproc-per-node={distributed.nproc_per_node}",
        "--max-restarts=0", f"--log-dir={log_dir}", "--redirects=3", "--tee=3", "--local-ranks-filter=0",
    ]
    if distributed.nnodes == 1:
        command += ["--standalone"]
    else:  # static rendezvous: node ranks are the recipe's, every node dials node 0
        command += [f"--node-rank={distributed.node_rank}", f"--master-addr={host}", f"--master-port={port}"]
    return command + ["-m", "adaptflow.stages", str(spec_path)]


def deepspeed_command(distributed: DistributedConfig, spec_path: Path) -> list[str]:
    """The deepspeed launcher on this node, or over ssh on the hostfile's nodes (it starts them all)."""
    host, _, port = distributed.rdzv_endpoint.rpartition(":")
    if distributed.nnodes == 1 and distributed.hostfile is None:
        host, port = "127.0.0.1", str(free_port())
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", f"--num_nodes={distributed.nnodes}",
        f"--num_gpus={distributed.nproc_per_node}", f"--master_addr={host}", f"--master_port={port}",
    ]
    if distributed.hostfile is not None:
        command += [f"--hostfile={distributed.hostfile}"]
        hosts = {line.split()[0] for line in Path(distributed.hostfile).read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")}
        if hosts <= {"localhost", "127.0.0.1"}:
            command += ["--no_ssh_check"]  # no ssh to reach this machine itself
    return command + ["--no_local_rank", "--module", "adaptflow.stages", str(spec_path)]  # LOCAL_RANK is in the env


def _rank_environment(distributed: DistributedConfig) -> dict[str, str]:
    env = dict(os.environ)
    threads = distributed.omp_num_threads or max(1, (os.cpu_count() or 1) // distributed.nproc_per_node)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _run(command: list[str], env: dict[str, str], *, timeout: float) -> tuple[int, list[str]]:
    """Run `command` in its own process group, logging its output; kill the group at the timeout."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            line = line.rstrip("\n")
            log.info("%s", line)
            tail.append(line)
            del tail[:-400]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(5)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(timeout=5)
        raise StageFailed(f"launched stage timed out after {timeout / 60:.0f} minutes "
                          "(distributed.timeout_minutes); every rank was stopped") from None
    reader.join(timeout=5)
    return returncode, tail


# A rank that lost its peers (the collective's connection dropped) or that the launcher stopped with SIGTERM
# after another rank died is a casualty, not the cause; torchrun's "first observed failure" can be such a rank
# when the real cause (say a SIGKILL, which leaves no error file) is observed a moment later.
_CASUALTY = re.compile(r"Connection (reset|closed|refused)|by peer|Broken pipe|Socket closed|[Tt]imed? ?out|"
                       r"pair closure|SIGTERM")


def _read_error_file(path: Path) -> tuple[str, int] | None:
    """(message, timestamp) of an exception file written by torch's `record` (torchrun's error.json)."""
    try:
        message = json.loads(path.read_text())["message"]
    except (OSError, ValueError, KeyError):
        return None
    if isinstance(message, dict):
        return str(message.get("message", "")), int(message.get("extraInfo", {}).get("timestamp", 0))
    return str(message), 0


def _reported_errors(errors: Path) -> tuple[str, list[str]] | None:
    """(rank, message lines) of the first exception a rank wrote to `errors/` (the deepspeed launcher has no
    failure summary of its own), preferring a rank that was not a casualty of another's failure."""
    reports = []
    for path in sorted(errors.glob("rank*.json")):
        if (read := _read_error_file(path)) is not None:
            text, stamp = read
            reports.append((bool(_CASUALTY.search(text)), stamp, path.stem.removeprefix("rank"), text.splitlines()))
    if not reports:
        return None
    _, _, rank, lines = min(reports)
    return rank, lines


def _root_cause(output: str) -> tuple[str, int] | None:
    """(local rank, exit code) of the rank that caused a torchrun failure, from its failure summary."""
    summary = output.rsplit("Failures:", 1)[-1] if "Failures:" in output else ""
    failures = [(m.group(1), int(m.group(2)), m.group(3)) for m in re.finditer(
        r"local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)(.*?)(?=\n\[\d+\]:|\n-{5,}|\n={5,}|\Z)",
        summary, re.S)]
    if not failures:
        return None
    causes = [f for f in failures if not _CASUALTY.search(f[2])]
    # A rank killed from outside (SIGKILL: kill -9, the OOM killer) or crashed (SIGSEGV, SIGBUS) caused what
    # followed, whatever its peers' transports then reported. (SIGABRT is left out: a rank whose collective
    # throws in C++ aborts with it as a casualty.)
    killed = [f for f in causes if -f[1] in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS)]
    torchrun_root = failures[-1]  # the summary lists the "first observed failure" last
    if killed:
        local_rank, exitcode, _ = torchrun_root if torchrun_root in killed else killed[0]
    else:
        local_rank, exitcode, _ = torchrun_root if torchrun_root in causes or not causes else causes[0]
    return local_rank, exitcode


def _failure_message(stage: str, returncode: int, logs: Path, tail: list[str], errors: Path) -> str:
    """Name the rank that caused the failure, how it ended, and that rank's last lines."""
    cause = _root_cause("\n".join(tail))
    if cause is None and (reported := _reported_errors(errors)):
        rank, lines = reported
        detail = "\n".join(f"    {line}" for line in lines[-12:])
        return f"stage {stage} failed on rank {rank}; its last lines:\n{detail}\n(all output: above, in the log)"
    if cause is None:
        lines = "\n".join(f"    {line}" for line in tail[-12:])
        return f"stage {stage} failed (launcher exit code {returncode}); its last lines:\n{lines}\n(all logs: {logs})"
    local_rank, exitcode = cause
    how = f"exit code {exitcode}"
    if exitcode < 0:
        how = f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
    run_logs = sorted((p for p in logs.glob(f"*/attempt_*/{local_rank}")), key=lambda p: p.stat().st_mtime)
    lines: list[str] = []
    if run_logs:
        if reported := _read_error_file(run_logs[-1] / "error.json"):
            lines = reported[0].splitlines()
        if not lines and (run_logs[-1] / "stderr.log").is_file():
            lines = (run_logs[-1] / "stderr.log").read_text(errors="replace").splitlines()
    detail = "\n".join(f"    {line}" for line in [line for line in lines if line.strip()][-12:]) or "    (no output)"
    return (f"stage {stage} failed on local rank {local_rank} ({how}); its last lines:\n{detail}\n"
            f"(every rank's output: {logs})")
