"""One cell, one run, whoever starts it; and no run left RUNNING by a runner that is gone.

A runner claims a cell by creating its run in the `claimed` state, with where the runner lives
(tags runner_host, runner_pid, runner_started: the process's start time, so that a reused pid is
not taken for it) and a heartbeat (tag heartbeat, unix seconds, renewed while the cell runs). It
then reads the cell's runs back: the oldest live claim wins (by start time, then run id, the
same order for every reader), and a runner that finds an older one, or a run that finished the
cell meanwhile, deletes its own claim and leaves the cell to it. On an sqlite store the claim and
the read back are one step under the store's lock; on a server the runner waits
`runner.claim_settle_s` between them, longer than a claim takes to reach the store, so that two
claims made at once both see each other.

A run left RUNNING whose runner is gone (killed outright, the OOM killer, a node that rebooted)
is closed KILLED with status `killed` and the reason before cells start in its experiment: on the
runner's host when its process is not there, elsewhere when its heartbeat is older than
`runner.stale_after_s`. Its cell then runs again, as a killed cell does.
"""

import socket
import time
from datetime import UTC, datetime

import pandas as pd
import psutil
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from harness.tracking import mlflow_store, runs

RUNNER_TAGS = ("runner_host", "runner_pid", "runner_started", "heartbeat")


def runner_tags() -> dict:
    """Where this runner lives, and its first heartbeat."""
    return {"runner_host": socket.gethostname(), "runner_pid": str(psutil.Process().pid),
            "runner_started": f"{psutil.Process().create_time():.2f}",
            "heartbeat": f"{time.time():.0f}"}


def close_stale(client: MlflowClient, experiment_id: str, stale_after_s: float,
                fingerprint: str | None = None) -> list[str]:
    """Close the experiment's RUNNING runs (of one cell, with `fingerprint`) whose runner is gone;
    the ids closed."""
    # A harness run has a cell tag; a run someone logged otherwise is not the harness's to close.
    query = "attributes.status = 'RUNNING'" + (f" and tags.cell = '{fingerprint}'"
                                               if fingerprint else " and tags.cell != ''")
    closed = []
    for run in client.search_runs([experiment_id], query, max_results=10000):
        gone = _runner_gone(run, stale_after_s)
        if gone is None:
            continue
        reason, last_seen = gone
        try:
            mlflow_store.close(client, run.info.run_id, "killed",
                               f"{run.data.tags.get('phase', 'start')}: runner vanished: {reason} "
                               "(last seen "
                               f"{datetime.fromtimestamp(last_seen, UTC):%Y-%m-%d %H:%M:%S} "
                               "UTC); a rerun runs this cell again", int(last_seen * 1000))
        except MlflowException as error:
            if error.error_code != "PERMISSION_DENIED":
                raise
            print(f"[harness] run {run.info.run_id} ({run.info.run_name}) looks stale (its "
                  f"{reason}), and this user may not close it: its owner or the admin can")
            continue
        print(f"[harness] closed run {run.info.run_id} ({run.info.run_name}) as killed: its "
              f"{reason}")
        closed.append(run.info.run_id)
    return closed


def _runner_gone(run, stale_after_s: float) -> tuple[str, float] | None:
    """(why, when it was last seen) where the run's runner is gone, else None."""
    tags = run.data.tags
    last_seen = float(tags.get("heartbeat", run.info.start_time / 1000))
    host, pid = tags.get("runner_host"), tags.get("runner_pid")
    if host == socket.gethostname() and pid is not None:
        alive = _alive(int(pid), float(tags.get("runner_started", 0)))
        if alive:
            return None
        return (f"runner (pid {pid} on {host}) is not running"
                + ("" if alive is None else " (the pid is another process's now)"), last_seen)
    silent_s = time.time() - last_seen
    if silent_s <= stale_after_s:
        return None
    where = f"pid {pid} on {host}" if host else "a runner that left no address"
    return (f"runner ({where}) sent no heartbeat for {silent_s:.0f} s (runner.stale_after_s="
            f"{stale_after_s:g})", last_seen)


def _alive(pid: int, started: float) -> bool | None:
    """Whether `pid` is the process that started at `started`: False where another process has
    its pid now, None where no process has."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return None


def claim(client: MlflowClient, experiment_id: str, name: str, fingerprint: str, params: dict,
          config_yaml: str, *, tracking_uri: str, settle_s: float, force: bool,
          limits: dict) -> tuple[str | None, str | None]:
    """Claim the cell: (its new run id, None), or (None, why another run has it)."""
    tags = {"cell": fingerprint, "status": "claimed", **runner_tags()}
    with mlflow_store.store_lock(tracking_uri):
        run_id = mlflow_store.start_run(client, experiment_id, name, params, tags, config_yaml)
        if not tracking_uri.startswith("sqlite:"):
            time.sleep(settle_s)
        holder = _holder(runs.of_experiment(client, experiment_id, f"tags.cell = "
                                                                   f"'{fingerprint}'"),
                         run_id, fingerprint, force, limits)
        if holder is not None:
            client.delete_run(run_id)  # one cell, one run: the claim that lost leaves none
            return None, holder
    client.set_tag(run_id, "status", "running")
    return run_id, None


def _holder(cell_runs: pd.DataFrame, own: str, fingerprint: str, force: bool,
            limits: dict) -> str | None:
    """Why another run holds the cell: an older live claim, or (unless `force`) a finished run."""
    live = cell_runs[cell_runs.status == "RUNNING"].sort_values(["start_time", "run_id"])
    first = live.iloc[0] if len(live) else None
    if first is not None and first.run_id != own:
        return f"running in run {first.run_id} on {first.get('tags.runner_host', '?')}"
    done = None if force else runs.finished(cell_runs, fingerprint, limits)
    if done is not None:
        return f"already {done['tags.status']} in run {done['run_id']}"
    return None
