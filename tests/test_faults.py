"""The fault suite: nothing lost, nobody let in, against real processes. A runner killed outright,
a tracking server that goes away mid-cell, two sweeps of one experiment at once (sqlite and
PostgreSQL), and the journal replayed later. Each test records what it checked and its figures
(`fault_figures`); `make faults` runs this file and writes them into reports/faults.md."""

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import mlflow
import psutil
import pytest
from mlflow import MlflowClient

from harness.measure.nvml import init_nvml, visible_devices
from harness.tracking import claims, journal, mlflow_store, runs
from tests.conftest import (
    REPO,
    Pauses,
    folder_store_overrides,
    free_port,
    held_run,
    mlflow_serving,
    run_figures,
)

QUICK = ["model=t5-tiny", "method=lora", "eval.max_samples=4"]


def _harness(tmp_path, *args, pauses: Pauses | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=pauses and pauses.environment)


def _experiment_runs(client, name) -> list:
    found = client.get_experiment_by_name(name)
    return [] if found is None else client.search_runs([found.experiment_id])


def _exactly_once(client, run, name: str) -> tuple[int, int]:
    """(points of metric `name`, distinct steps among them) in the run."""
    history = client.get_metric_history(run.info.run_id, name)
    return len(history), len({point.step for point in history})


@pytest.mark.slow
def test_a_runner_killed_outright_leaves_no_process_and_its_run_is_closed(tmp_path,
                                                                          fault_figures):
    store = folder_store_overrides(tmp_path, "vanished")
    cell = [*QUICK, "train.max_steps=5"]
    pauses = Pauses(tmp_path / "pauses", hold=("train",))
    runner = _harness(tmp_path, *cell, *store, pauses=pauses)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        [held] = pauses.caught("train", runner)  # the cell waits there after its first step
        training = held_run(client, "vanished", seed=42)
        started = psutil.Process(runner.pid).children(recursive=True)
        assert held["pid"] == int(training.data.tags["pid"])
        assert held["pid"] in {process.pid for process in started}
        killed_at = time.monotonic()
        os.kill(runner.pid, signal.SIGKILL)  # as the OOM killer, or a node's reboot, does
        runner.wait(timeout=30)
        _, survivors = psutil.wait_procs(started, timeout=20)
        ended_s = time.monotonic() - killed_at
    finally:
        runner.kill()
    assert survivors == [], [process.cmdline() for process in survivors]
    holding = _holding_a_gpu({process.pid for process in started})
    assert holding == [], f"processes of the killed runner still hold GPU memory: {holding}"
    assert client.get_run(training.info.run_id).info.status == "RUNNING"  # nobody closed it

    # The next sweep in the experiment closes it, and runs its cell again.
    rerun = subprocess.run([sys.executable, "-m", "harness", "-m", *cell, *store], cwd=REPO,
                           text=True, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"closed run {training.info.run_id}" in rerun.stdout
    assert "1 to run, 0 to skip, 0 done already" in rerun.stdout
    stale = client.get_run(training.info.run_id)
    assert (stale.data.tags["status"], stale.info.status) == ("killed", "KILLED")
    reason = stale.data.tags["status_reason"]
    assert reason.startswith(f"train: runner vanished: runner (pid {runner.pid} on ") and \
        "is not running (last seen " in reason
    assert stale.info.end_time <= int(time.time() * 1000)
    every = _experiment_runs(client, "vanished")
    assert sorted(run.data.tags["status"] for run in every) == ["killed", "ok"]
    assert all(run.info.status != "RUNNING" for run in every)
    fault_figures.update(
        fault=f"runner SIGKILL mid-training ({_device(training)} cell)",
        checked="the cell, the sampler and the cells' server end on their own; the next sweep "
                "closes the run KILLED (runner vanished) and runs the cell again",
        processes_started=len(started), survivors=len(survivors),
        holding_a_gpu=len(holding),
        seconds_until_all_ended=round(ended_s, 1), **run_figures(every, started=2))


def _holding_a_gpu(pids: set) -> list[int]:
    """Which of `pids` NVML sees holding memory on any GPU (none without a driver)."""
    nvml = init_nvml()
    if nvml is None:
        return []
    return [process.pid for handle in visible_devices(nvml, None)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if process.pid in pids]


def _device(run) -> str:
    return "CUDA" if "gpu" in run.data.tags else "CPU"


def test_runs_whose_runner_is_gone_are_closed_and_live_ones_kept(store, fault_figures):
    client, experiment_id = mlflow_store.connect(_tracking(store, "stale"))
    here = claims.runner_tags()
    now = time.time()
    cases = {  # name: (tags, closed?)
        "this runner": ({**here}, False),
        "a pid reused by another process": ({**here, "runner_started": "1000.00"}, True),
        "a process that is gone": ({**here, "runner_pid": str(_a_pid_that_is_gone())}, True),
        "another host, heartbeat fresh": ({"runner_host": "node-7", "runner_pid": "1",
                                           "heartbeat": f"{now - 30:.0f}"}, False),
        "another host, silent": ({"runner_host": "node-7", "runner_pid": "1",
                                  "heartbeat": f"{now - 900:.0f}"}, True),
    }
    made = {name: client.create_run(experiment_id, run_name=name, tags={"cell": "c",
                                                                         **tags}).info.run_id
            for name, (tags, _) in cases.items()}
    # A run logged by something else than the harness (no cell tag) is not its to close.
    foreign = client.create_run(experiment_id, run_name="a colleague's", start_time=1000,
                                tags={"runner_host": "node-7"}).info.run_id
    client.set_tag(made["another host, silent"], "phase", "eval")
    closed = claims.close_stale(client, experiment_id, stale_after_s=600)
    assert set(closed) == {made[name] for name, (_, stale) in cases.items() if stale}
    assert client.get_run(foreign).info.status == "RUNNING"
    for name, (_, stale) in cases.items():
        run = client.get_run(made[name])
        assert run.info.status == ("KILLED" if stale else "RUNNING"), name
        if stale:
            assert run.data.tags["status"] == "killed"
            assert re.match(r"(start|eval): runner vanished: ", run.data.tags["status_reason"])
    silent = client.get_run(made["another host, silent"])
    assert silent.data.tags["status_reason"].startswith("eval: runner vanished: ")  # its phase
    assert "sent no heartbeat for 9" in silent.data.tags["status_reason"]
    # Closed as of when it was last seen.
    assert silent.info.end_time == int(cases["another host, silent"][0]["heartbeat"]) * 1000
    assert "the pid is another process's now" in client.get_run(
        made["a pid reused by another process"]).data.tags["status_reason"]
    fault_figures.update(fault="stale runs (same host and another host)",
                         checked="closed: a gone or reused pid here, a silent heartbeat "
                                 "elsewhere; kept: a live runner, a fresh heartbeat",
                         runs=len(cases), closed=len(closed), wrongly_closed=0)


def _a_pid_that_is_gone() -> int:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def _tracking(store, experiment: str):
    from omegaconf import OmegaConf

    return OmegaConf.create({"uri": store["uri"], "experiment": experiment,
                             "artifact_location": f"{store['artifacts']}/{experiment}"})


def test_two_runners_claiming_one_cell_at_once_leave_one_run(store, fault_figures):
    client, experiment_id = mlflow_store.connect(_tracking(store, "claims"))
    results, start = [], threading.Barrier(4)

    def claim():
        start.wait()
        results.append(claims.claim(client, experiment_id, "cell", "f00d", {}, "", limits={},
                                    tracking_uri=store["uri"], settle_s=0, force=False))

    racing = [threading.Thread(target=claim) for _ in range(4)]
    for thread in racing:
        thread.start()
    for thread in racing:
        thread.join()
    won = [run_id for run_id, _ in results if run_id is not None]
    assert len(won) == 1
    assert {holder for _, holder in results if holder} == {
        f"running in run {won[0]} on {claims.runner_tags()['runner_host']}"}
    cell_runs = runs.of_experiment(client, experiment_id, "tags.cell = 'f00d'")
    assert list(cell_runs.run_id) == won  # the claims that lost left no run
    fault_figures.update(fault="four claims of one cell at once (threads, sqlite)",
                         checked="one claim wins, the others name its run and leave none",
                         claims=4, runs=len(cell_runs), winners=len(won))


@pytest.mark.slow  # starts `harness.sync` twice
def test_a_journal_left_by_a_store_that_did_not_answer_is_synced_once(store, tmp_path,
                                                                      fault_figures):
    # A run whose store went away: its journal keeps what it could not deliver.
    client, experiment_id = mlflow_store.connect(_tracking(store, "journaled"))
    run_id = client.create_run(experiment_id, run_name="cell").info.run_id
    away = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    folder = tmp_path / "journal" / run_id
    written = journal.Journal(folder, away, run_id, experiment_id)
    (tmp_path / "predictions.csv").write_text("dialogue,summary\na,b\n")
    (tmp_path / "adapter" / "nested").mkdir(parents=True)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "nested" / "weights.bin").write_bytes(b"\0" * 64)
    for step in range(1, 301):
        written.metrics({"train_loss": 1 / step, "lr": 0.1}, step, 1_700_000_000_000 + step)
    written.params({"data.source_length_resolved": 512})
    written.artifact(tmp_path / "predictions.csv")
    written.artifact(tmp_path / "adapter", "adapter")  # a folder's files, as log_artifacts does
    written.text("a: 1\n", "config.yaml")
    written.tags({"status": "ok"})
    written.end("FINISHED")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        assert written.start().close(wait_s=2) == 306  # nothing delivered; all kept
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert journal.pending(tmp_path / "journal") == [folder]
    still_away = subprocess.run([sys.executable, "-m", "harness.sync", "--journal-dir",
                                 str(tmp_path / "journal")], cwd=REPO, text=True,
                                capture_output=True, timeout=300,
                                env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert still_away.returncode == 6 and f"still kept in {folder}" in still_away.stdout
    assert journal.pending(tmp_path / "journal") == [folder]  # nothing lost by trying

    # `python -m harness.sync` into the store, then the same replay again from a copy made
    # before it (a sync that died before it recorded what it delivered): nothing twice.
    kept = shutil.copytree(folder, tmp_path / "kept")
    for attempt in range(2):
        synced = subprocess.run([sys.executable, "-m", "harness.sync", "--journal-dir",
                                 str(tmp_path / "journal"), "--tracking-uri", store["uri"]],
                                cwd=REPO, text=True, capture_output=True, timeout=300)
        assert synced.returncode == 0, synced.stderr[-3000:]
        assert f"run {run_id}: 306 journal entries delivered" in synced.stdout
        assert not folder.exists()  # delivered, removed
        if attempt == 0:
            shutil.copytree(kept, folder)
    run = client.get_run(run_id)
    assert _exactly_once(client, run, "train_loss") == (300, 300)
    assert len(client.get_metric_history(run_id, "lr")) == 300
    assert run.data.params["data.source_length_resolved"] == "512"
    assert {artifact.path for artifact in client.list_artifacts(run_id)} == {
        "predictions.csv", "config.yaml", "adapter"}
    assert {artifact.path for artifact in client.list_artifacts(run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/nested"}
    assert [artifact.path for artifact in client.list_artifacts(run_id, "adapter/nested")] == [
        "adapter/nested/weights.bin"]
    assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "ok")
    again = subprocess.run([sys.executable, "-m", "harness.sync", "--journal-dir",
                            str(tmp_path / "journal")], cwd=REPO, text=True,
                           capture_output=True, timeout=120)
    assert "nothing to deliver" in again.stdout
    fault_figures.update(fault="store away until the run ended; `make sync` later, twice",
                         checked="every entry delivered once, the second replay writes nothing",
                         entries=306, metric_steps_expected=300,
                         metric_steps_found=_exactly_once(client, run, "train_loss")[0],
                         lost=300 - _exactly_once(client, run, "train_loss")[1])


# `mlflow server` needs MLflow's whole package; where only its client is (mlflow-skinny, as on
# the lent GPU machine) there is no server to stop.
needs_a_server = pytest.mark.skipif(importlib.util.find_spec("flask") is None,
                                    reason="mlflow server is not installed (mlflow-skinny)")


def _two_sweeps_at_once(tmp_path, *args) -> list[str]:
    sweeps = [subprocess.Popen([sys.executable, "-m", "harness", "-m", *QUICK,
                                "train.max_steps=5", "method.r=2,4", *args,
                                f"hydra.sweep.dir={tmp_path}/sweep{number}"],
                               cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT) for number in range(2)]
    outputs = [sweep.communicate(timeout=600)[0] for sweep in sweeps]
    for sweep, output in zip(sweeps, outputs):
        # 6 (incomplete): the sweep ended while the other still ran the cell it left to it.
        assert sweep.returncode in (0, 6), output[-3000:]
        assert sweep.returncode == 0 or "1 running" in output or "1 claimed" in output, output
    return outputs


def _one_run_per_cell(client, experiment: str, outputs: list[str]) -> dict:
    every = _experiment_runs(client, experiment)
    cells = [run.data.tags["cell"] for run in every]
    assert len(cells) == 2 and len(set(cells)) == 2, cells  # each cell once
    assert {run.data.tags["status"] for run in every} == {"ok"}
    # A cell the other sweep has: claimed by it and running, or finished by it already.
    elsewhere = sum(output.count(": running in run ") + output.count(": already ok in run ")
                    for output in outputs)
    return {"sweeps": 2, "cells": 2, "runs": len(every), "left_to_the_other_sweep": elsewhere}


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_new_sqlite_store_run_each_cell_once(tmp_path,
                                                                            fault_figures):
    outputs = _two_sweeps_at_once(tmp_path, *folder_store_overrides(tmp_path, "together",
                                                                    new_store=True))
    found = _one_run_per_cell(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), "together",
                              outputs)
    assert found["left_to_the_other_sweep"] == 2, outputs
    fault_figures.update(fault="two identical sweeps started together on a new sqlite store",
                         checked="each cell runs once; the other sweep names the run that has "
                                 "it", **found)


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_server_run_each_cell_once(mlflow_server, tmp_path,
                                                                    fault_figures):
    outputs = _two_sweeps_at_once(tmp_path, "tracking=server", f"tracking.uri={mlflow_server}",
                                  "tracking.experiment=together", f"cache_dir={tmp_path}/c")
    found = _one_run_per_cell(MlflowClient(mlflow_server), "together", outputs)
    assert found["left_to_the_other_sweep"] == 2, outputs
    fault_figures.update(fault="two identical sweeps started together on a server "
                               "(PostgreSQL)",
                         checked="each cell runs once; the other sweep names the run that has "
                                 "it", **found)


@pytest.mark.slow
@needs_a_server
def test_a_tracking_server_that_goes_away_loses_nothing(tmp_path, fault_figures):
    # A sweep of two cells logging to a real `mlflow server`. The server is SIGKILLed (with its
    # workers) while cell 1 trains and comes back on its store: cell 1 trains on and its journal
    # catches up. It is killed again while cell 2 trains and stays away until the sweep has
    # ended: the summary names cell 2's run, and `python -m harness.sync` delivers it later.
    port, backend, journals = free_port(), f"sqlite:///{tmp_path}/server.db", tmp_path / "journal"
    serve = ("server", backend, tmp_path / "server.log", "--artifacts-destination",
             str(tmp_path / "served"), "--workers", "1")
    steps, killed = 20, signal.SIGKILL
    pauses = Pauses(tmp_path / "pauses")  # each cell waits after its first step and before ROUGE
    sweep = None
    try:
        with mlflow_serving(*serve, port=port, stop_signal=killed) as address:
            sweep = subprocess.Popen(
                [sys.executable, "-m", "harness", "-m", *QUICK, f"train.max_steps={steps}",
                 "train.seed=1,2", "tracking=server", f"tracking.uri={address}",
                 "tracking.experiment=outage", f"tracking.journal_dir={journals}",
                 "tracking.deliver_wait_s=3", f"cache_dir={tmp_path}/c",
                 f"hydra.sweep.dir={tmp_path}/sweep"],
                cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=pauses.environment)
            said = _Output(sweep)
            client = MlflowClient(address)
            [cell] = pauses.caught("train", sweep, seed=1)
            first = held_run(client, "outage", seed=1)
        went_away = time.monotonic()
        pauses.go("train", cell["pid"])  # it trains on while the server is away, journaling
        pauses.caught("eval", sweep, seed=1)
        said.wait_for("the tracking store does not answer")
        with mlflow_serving(*serve, port=port, stop_signal=killed):
            # Cell 1 is still held: its journal catches up while the cell is alive.
            said.wait_for(f"run {first.info.run_id}: the tracking store answers again after")
            first_outage_s = time.monotonic() - went_away
            pauses.go("eval", cell["pid"])
            pauses.caught("train", sweep, seed=2)
            second = held_run(client, "outage", seed=2)
        pauses.go("train")  # cell 2 trains on; the server stays away until the sweep ends
        pauses.caught("eval", sweep, seed=2)
        said.wait_for("the tracking store does not answer", times=2)
        pauses.go("eval")
        output = said.all(timeout_s=600)
    finally:
        if sweep is not None:
            sweep.kill()
    assert sweep.returncode == 0, output[-3000:]
    assert output.count("the tracking store does not answer") == 2
    assert f"run {first.info.run_id}: the tracking store answers again after" in output
    assert f"[harness] not delivered yet: run {second.info.run_id}: " in output
    assert "no summary of outage: the store does not answer" in output and "`make sync`" in output
    with mlflow_serving(*serve, port=port):
        synced = subprocess.run([sys.executable, "-m", "harness.sync", "--journal-dir",
                                 str(journals)], cwd=REPO, text=True, capture_output=True,
                                timeout=300)
        assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
        assert f"run {second.info.run_id}: " in synced.stdout
        mlflow.set_tracking_uri(address)  # a run's model artifacts are listed through it
        runs = [client.get_run(each.info.run_id) for each in (first, second)]
        found = [_exactly_once(client, run, "train_loss") for run in runs]
        files = [{artifact.path for folder in (None, "adapter")
                  for artifact in client.list_artifacts(run.info.run_id, folder)}
                 for run in runs]
        models = client.search_logged_models([first.info.experiment_id])
    assert found == [(steps, steps)] * 2
    assert [(run.info.status, run.data.tags["status"]) for run in runs] == [("FINISHED", "ok")] * 2
    for artifacts in files:
        assert {"config.yaml", "memory_trace.csv", "memory_trace.png", "predictions.csv",
                "adapter/adapter_model.safetensors"} <= artifacts
    assert all("rouge1" in run.data.metrics and "cpu_peak_mib" in run.data.metrics
               for run in runs)
    assert sorted(model.source_run_id for model in models) == sorted(
        run.info.run_id for run in runs)
    assert not journal.pending(journals) and not any(journals.iterdir())
    fault_figures.update(fault="tracking server SIGKILLed mid-cell twice: back mid-cell 1, away "
                               "until after the sweep (then `make sync`)",
                         checked="the cells train on; every step, artifact, tag and status "
                                 "arrive once, cell 2's through sync",
                         device=_device(runs[0]), first_outage_s=round(first_outage_s, 1),
                         runs=2, metric_steps_expected=2 * steps,
                         metric_steps_found=sum(count for count, _ in found),
                         distinct_steps=sum(distinct for _, distinct in found),
                         lost=2 * steps - sum(distinct for _, distinct in found))


@pytest.mark.slow  # starts pytest to collect the suite
def test_make_faults_names_tests_that_exist():
    # bench/faults.py picks its cases by test id: a renamed test would leave a case unrun.
    from bench import faults

    found = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                            "-p", "no:cacheprovider", *faults.FAULT_TESTS,
                            *faults.GPU_FAULT_TESTS], cwd=REPO, text=True, capture_output=True,
                           timeout=300)
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-3000:]


class _Output:
    """A process's output, read as it comes, so that a test can wait for what it says."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines = process, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(process.stdout),
                                       daemon=True)
        self.reader.start()

    def wait_for(self, text: str, times: int = 1, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while "".join(self.lines).count(text) < times:
            assert self.reader.is_alive(), f"the process ended without saying {text!r}"
            assert time.monotonic() < deadline, f"not said in {timeout_s} s: {text!r}"
            time.sleep(0.1)

    def all(self, timeout_s: float) -> str:
        """Everything it said, once it has ended."""
        self.process.wait(timeout=timeout_s)
        self.reader.join(timeout=30)
        return "".join(self.lines)


@contextlib.contextmanager
def _small_disk(folder, size: str):
    """A tmpfs of `size` at `folder` while the block runs (True), where this user may mount
    one; else nothing (False)."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(folder) -> None:
    """Write into `folder` until its disk is full."""
    with open(folder / "filler", "wb") as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * (1 << 20))
                filler.flush()


@pytest.mark.slow
def test_a_full_disk_mid_cell_ends_it_failed_and_loses_nothing(tmp_path, fault_figures):
    """The disk that holds the cell's scratch folder, its cache and the run's journal fills up
    while the cell waits at its evaluation (an explicit pause point): the cell ends failed,
    saying so and in which phase, the command exits 3, the run is closed, and every step it
    trained reaches the store. Where no tmpfs can be mounted, the cell's file size limit is set
    to zero instead (the same failure through EFBIG)."""
    pauses = Pauses(tmp_path / "pauses", hold=("eval",))
    with _small_disk(tmp_path / "disk", "64m") as mounted:
        disk = tmp_path / "disk"
        (disk / "tmp").mkdir()
        cell = subprocess.Popen(
            [sys.executable, "-m", "harness", *QUICK, "train.max_steps=5",
             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=full_disk",
             f"tracking.journal_dir={disk}/journal", f"cache_dir={disk}/cache"],
            cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**pauses.environment, "TMPDIR": str(disk / "tmp")})
        try:
            [held] = pauses.caught("eval", cell)
            pid = held["pid"]
            if mounted:
                _fill(disk)
            else:
                import resource

                resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0))
            pauses.go("eval")
            output, _ = cell.communicate(timeout=600)
        finally:
            cell.kill()
    assert cell.returncode == 3, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = _experiment_runs(client, "full_disk")
    reason = run.data.tags["status_reason"]
    assert (run.info.status, run.data.tags["status"]) == ("FAILED", "failed")
    assert reason.startswith("eval: ") and ("no space left on the device" in reason
                                           if mounted else "file size limit" in reason), reason
    assert _exactly_once(client, run, "train_loss") == (5, 5)  # every trained step kept
    assert "Traceback" not in output.split("[harness]")[-1]
    fault_figures.update(
        fault="a full disk mid-cell (" + ("a tmpfs filled" if mounted else
                                          "the cell's file size limit set to 0") + ")",
        checked="the cell ends failed with the phase and the cause, exit code 3, the run "
                "closed, every trained step in the store",
        **run_figures([run], 1), train_steps_kept=5)
