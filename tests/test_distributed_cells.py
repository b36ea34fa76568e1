"""Distributed cells end to end, as a user runs them (`python -m harness strategy=...`): two ranks
on gloo train and their run shows both; a rank that dies, runs out of memory or waits on a
collective past strategy.timeout_s ends the cell with the reason and the rank; a SIGTERM stops
every rank and closes the run killed; and no rank outlives its cell."""

import re
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from harness.tracking import names
from tests.conftest import (
    REPO,
    Pauses,
    folder_store_overrides,
    free_port,
    run_figures,
    run_harness,
)

pytestmark = pytest.mark.slow

SHORT = ["eval.max_samples=4", "train.max_steps=4"]


def _client(folder) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder}/mlflow.db")


def _only_run(folder, experiment: str):
    client = _client(folder)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _held(folder, experiment: str, *overrides: str):
    """A ddp cell of two ranks, started, and its rank processes in rank order once both wait at
    the pause point after the first step (every process its launcher started follows them)."""
    pauses = Pauses(folder / "pauses", hold=("train",))
    cell = subprocess.Popen(
        [sys.executable, "-m", "harness", "strategy=ddp", "train.max_steps=5",
         "eval.max_samples=4", *overrides, *folder_store_overrides(folder, experiment)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=pauses.environment)
    try:
        held = pauses.caught("train", cell, ranks=2)
        launcher = psutil.Process(held[0]["pid"]).parent()
        ranks = [psutil.Process(who["pid"]) for who in held]
        return cell, pauses, ranks + launcher.children(recursive=True)
    except BaseException:
        cell.kill()
        raise


def _survivors(processes: list[psutil.Process]) -> list[int]:
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_an_fsdp_cell_trains_on_two_ranks_and_its_run_shows_both(tmp_path):
    done = run_harness(REPO, "model=t5-tiny", "data=fixture", "strategy=fsdp",
                       "strategy.nproc_per_node=2", *SHORT,
                       *folder_store_overrides(tmp_path, "fsdp"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = _only_run(tmp_path, "fsdp")
    assert run.info.run_name == "t5-tiny/lora-r8/fp32/fsdp-x2"
    assert (run.data.tags["status"], run.data.params["strategy.name"]) == ("ok", "fsdp")
    metrics = run.data.metrics
    # Each name a distributed run logs is declared (harness/tracking/names.py), ranks' too.
    assert names.undeclared(metrics, names.METRICS) == set()
    assert names.undeclared(run.data.tags, names.TAGS) == set()
    for rank in (0, 1):  # each rank's host memory, sampled, and its own figures, measured
        assert metrics[f"cpu_peak_mib_rank{rank}"] > 300
        assert metrics[f"cpu_train_peak_mib_rank{rank}"] > 300
        assert f"cpu_baseline_mib_rank{rank}" in metrics
        assert f"mem_params_mib_rank{rank}" in metrics
    # The host peak is the whole tree's: the launcher and both ranks.
    assert metrics["cpu_peak_mib"] > metrics["cpu_peak_mib_rank0"] + metrics["cpu_peak_mib_rank1"]
    assert metrics["train_steps"] == 4 and "rouge1" in metrics
    client = _client(tmp_path)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "memory_trace.csv", "predictions.csv"} <= artifacts
    trace = pd.read_csv(client.download_artifacts(run.info.run_id, "memory_trace.csv",
                                                  str(tmp_path)))
    assert {"cpu_mib_rank0", "cpu_mib_rank1"} <= set(trace.columns)
    assert trace.loc[trace.phase == "train", "cpu_mib_rank1"].notna().all()


def test_a_rank_killed_ends_the_cell_failed_naming_it_and_no_rank_survives(tmp_path,
                                                                           fault_figures):
    cell, pauses, ranks = _held(tmp_path, "killed_rank")
    try:
        ranks[1].send_signal(signal.SIGKILL)
        pauses.go("train")  # rank 0's next collective finds rank 1 gone
        output, _ = cell.communicate(timeout=180)
    finally:
        cell.kill()
    run = _only_run(tmp_path, "killed_rank")
    assert run.data.tags["status"] == "failed", output[-3000:]
    # Rank 0 failed too, on the collective rank 1 left: rank 1 is named as the cause (by its
    # signal where the launcher saw it die first).
    assert re.search(r"^train: rank 1 (was killed by SIGKILL|ended without a result)",
                     run.data.tags["status_reason"]), run.data.tags["status_reason"]
    assert _survivors(ranks) == []
    fault_figures.update(fault="a rank SIGKILLed mid-training (ddp, 2 ranks)",
                         checked="the cell ends failed naming rank 1; no rank survives",
                         processes=len(ranks), survivors=len(_survivors(ranks)),
                         **run_figures([run], started=1))


def test_a_collective_waiting_past_the_timeout_ends_the_cell_failed(tmp_path):
    cell, pauses, ranks = _held(tmp_path, "hung_rank", "strategy.timeout_s=10")
    try:
        ranks[1].suspend()  # rank 0's next collective waits for it in vain
        pauses.go("train")
        started = time.monotonic()
        output, _ = cell.communicate(timeout=240)
    finally:
        cell.kill()
    run = _only_run(tmp_path, "hung_rank")
    assert run.data.tags["status"] == "failed", output[-3000:]
    assert "rank 0" in run.data.tags["status_reason"]
    assert time.monotonic() - started < 120
    assert _survivors(ranks) == []


def test_sigterm_stops_every_rank_and_closes_the_run_killed(tmp_path, fault_figures):
    cell, _, ranks = _held(tmp_path, "terminated")
    try:
        cell.send_signal(signal.SIGTERM)  # while both ranks wait after their first step
        output, _ = cell.communicate(timeout=180)
    finally:
        cell.kill()
    run = _only_run(tmp_path, "terminated")
    assert run.data.tags["rank_pids"] == ",".join(str(rank.pid) for rank in ranks[:2])
    assert (run.data.tags["status"], run.info.status) == ("killed", "KILLED"), output[-3000:]
    assert _survivors(ranks) == []
    fault_figures.update(fault="SIGTERM to a distributed cell's runner (ddp, 2 ranks)",
                         checked="every rank stops; the run ends KILLED", processes=len(ranks),
                         survivors=len(_survivors(ranks)), **run_figures([run], started=1))


def test_a_rank_out_of_memory_ends_the_cell_oom_naming_the_rank(tmp_path):
    # Each rank inherits the launcher's address-space cap; 200 of a 400-row global batch each
    # need more than it leaves.
    done = run_harness(REPO, "strategy=ddp", "runner.cpu_memory_limit_mib=3000",
                       "train.batch_size=400", "train.max_steps=2", "eval.max_samples=4",
                       *folder_store_overrides(tmp_path, "oom"))
    run = _only_run(tmp_path, "oom")
    assert run.data.tags["status"] == "oom", done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank " in run.data.tags["status_reason"]
    assert run.data.tags["oom_limit"] == "cpu"


def test_a_cell_across_two_nodes_meets_at_the_first_and_its_runner_records_both(tmp_path):
    # Two "nodes" on this machine: two runners whose agents rendezvous on 127.0.0.1.
    port = free_port()
    common = ["strategy=ddp", "strategy.nproc_per_node=1", "strategy.nnodes=2",
              f"strategy.master_port={port}", "strategy.master_addr=127.0.0.1", *SHORT,
              *folder_store_overrides(tmp_path, "two_nodes")]
    second = subprocess.Popen([sys.executable, "-m", "harness", "strategy.node_rank=1", *common],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        first = run_harness(REPO, "strategy.node_rank=0", *common)
        output, _ = second.communicate(timeout=300)
    finally:
        second.kill()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert second.returncode == 0, output[-3000:]
    assert "node 1 of 2 (the first node's run records the cell): ok" in output
    run = _only_run(tmp_path, "two_nodes")  # one run: the first node's
    assert run.info.run_name.endswith("/ddp-2x1") and run.data.tags["status"] == "ok"
    for rank in (0, 1):  # both nodes' ranks, gathered by the streaming one
        assert f"cpu_baseline_mib_rank{rank}" in run.data.metrics
    assert len(run.data.tags["rank_pids"].split(",")) == 2
