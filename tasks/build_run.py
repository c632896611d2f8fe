"""The build's MLflow parent run: opened before the first stage; at the end it gets the build report
(adaptflow.report) and is closed with the build's real status."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from adaptflow.errors import quiet_user_error_tracebacks
from adaptflow.lineage import git_commit
from adaptflow.recipe import Recipe
from adaptflow.tasks.context import BuildContext
from adaptflow.tracking.report import publish_report
from adaptflow.tracking.reuse import RECIPE_ARTIFACT
from adaptflow.tracking.runs import (
    end_run,
    ensure_experiment,
    flatten,
    log_params,
    redact_tree,
    resolve_tracking,
    start_run,
)

log = logging.getLogger("adaptflow.build")  # under "adaptflow": shown in Prefect's run logs

HEARTBEAT = "adaptflow.heartbeat"
HEARTBEAT_SECONDS = 60  # a live build stamps its run this often …
STALE_AFTER_SECONDS = 15 * 60  # … so one silent this long, on a host we cannot check, is dead


@contextmanager
def build_run(
    recipe: Recipe, *, tracking_uri: str | None, trigger: str, progress: bool = False, reuse: bool = True,
    recompute_from: str | None = None, rerun_of: str | None = None,
) -> Iterator[BuildContext]:
    from prefect.context import FlowRunContext

    quiet_user_error_tracebacks()
    tracking = resolve_tracking(recipe.tracking, recipe.workdir, tracking_uri)
    client = tracking.client()
    experiment_id = ensure_experiment(client, recipe.experiment_name, tracking.artifact_location)
    flow_run = getattr(FlowRunContext.get(), "flow_run", None)  # None outside a flow run
    if trigger == "deployment" and getattr(flow_run, "auto_scheduled", False):
        trigger = "schedule"  # created by the deployment's schedule, not by a person
    close_crashed_attempts(client, experiment_id, str(flow_run.id) if flow_run is not None else None)
    run_id = start_run(
        client,
        experiment_id,
        f"build-{recipe.domain}",
        tags={
            "adaptflow.kind": "build",
            "adaptflow.domain": recipe.domain,
            "adaptflow.recipe_digest": recipe.digest(),
            "adaptflow.trigger": trigger,
            "adaptflow.stages": ",".join(recipe.enabled_stages()),
            "git_commit": git_commit(),
            "prefect.flow_run_id": flow_run.id if flow_run else None,
            "prefect.deployment_id": getattr(flow_run, "deployment_id", None),
            "adaptflow.host": socket.gethostname(),
            "adaptflow.pid": os.getpid(),
            "adaptflow.reuse": "off" if not reuse else f"until {recompute_from}" if recompute_from else "on",
            "adaptflow.rerun_of": rerun_of,
        },
    )
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: loading %s runs Python code that ships with the model, with "
                    "this process's rights; turn it on only for model repositories you trust",
                    recipe.model.name or recipe.model.path)
        client.set_tag(run_id, "adaptflow.trust_remote_code", "true")
    try:
        resolved = recipe.model_dump(mode="json")
        log_params(client, run_id, flatten(resolved))
        client.log_dict(run_id, redact_tree(resolved), RECIPE_ARTIFACT)  # what `adaptflow rerun` starts from
        with heartbeat(client, run_id):
            yield BuildContext(recipe, tracking, experiment_id, run_id, progress, reuse=reuse,
                               recompute_from=recompute_from)
    except Exception:
        _publish_report(client, run_id, "FAILED")
        end_run(client, run_id, failed=True)
        raise
    except BaseException:  # interrupted: close the run, no report
        end_run(client, run_id, failed=True)
        raise
    _publish_report(client, run_id, "FINISHED")
    end_run(client, run_id)


def close_crashed_attempts(client, experiment_id: str, flow_run_id: str | None) -> None:
    """Builds that died without closing their runs (SIGKILL, a lost node): their build and stage runs were left
    RUNNING. Mark them KILLED, so nothing looks alive that is not. A build is known dead when its Prefect flow run
    is being retried (`prefect flow-run retry`: same flow run id), when it ran on this host and its process is
    gone, or, on another host, when its heartbeat has been silent for `STALE_AFTER_SECONDS`."""
    from adaptflow.tracking.runs import child_runs

    running = client.search_runs([experiment_id], filter_string="tags.`adaptflow.kind` = 'build' and "
                                                                "attributes.status = 'RUNNING'")
    for build in running:
        tags = build.data.tags
        if flow_run_id is not None and tags.get("prefect.flow_run_id") == flow_run_id:
            why = "its flow run crashed and was retried"
        elif tags.get("adaptflow.host") == socket.gethostname() and not _alive(tags.get("adaptflow.pid")):
            why = f"its process ({tags.get('adaptflow.pid')}) on this host is gone"
        elif (silent := _silent_seconds(tags.get(HEARTBEAT))) > STALE_AFTER_SECONDS:
            why = f"no heartbeat from {tags.get('adaptflow.host', 'its host')} for {silent / 60:.0f} min"
        else:
            continue
        for run in [*child_runs(client, build, status="RUNNING"), build]:
            client.set_tag(run.info.run_id, "adaptflow.note", f"killed: {why}")
            client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("build run %s was left running (%s): marked KILLED", build.info.run_id, why)


@contextmanager
def heartbeat(client, run_id: str) -> Iterator[None]:
    """Stamp the run with the time every `HEARTBEAT_SECONDS` while the block runs (from a daemon thread, so a
    long stage or a launched one keeps it going), for the sweeper on other hosts."""
    stop = threading.Event()

    def beat() -> None:
        try:
            client.set_tag(run_id, HEARTBEAT, f"{time.time():.0f}")
        except Exception as err:  # noqa: BLE001 - a missed beat is not a failed build; the next one may land
            log.debug("heartbeat of run %s not recorded: %s", run_id, err)

    def keep_beating() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            beat()

    beat()  # the first one before the build starts, so the run is never without one
    thread = threading.Thread(target=keep_beating, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _silent_seconds(stamp: str | None) -> float:
    """Seconds since a heartbeat stamp; 0 when there is none (a build from before heartbeats: leave it alone)."""
    try:
        return time.time() - float(stamp)
    except (TypeError, ValueError):
        return 0.0


def _alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError):
        return True  # no pid recorded: cannot tell, leave it alone
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _publish_report(client, run_id: str, status: str) -> None:
    """The build's HTML report, for failed builds too. A report that cannot be written is a warning, not a
    failed build: the model is already trained, evaluated and registered by then."""
    try:
        uri = publish_report(client, run_id, status=status)
    except Exception as err:  # noqa: BLE001 - reported, and recorded on the run
        log.warning("build report for run %s not written: %s", run_id, err, exc_info=True)
        client.set_tag(run_id, "adaptflow.report", f"not written: {err}"[:5000])
    else:
        log.info("build report: %s", uri)
