"""Cells that raise, are killed, or outgrow runner.cpu_memory_limit_mib, inside one real Hydra
sweep (`python -m harness -m ...`): each ends with its own status and reason, the other cells
finish ok, and no run is left RUNNING."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from harness.tracking.runs import finished_run
from tests.conftest import REPO, Pauses, folder_store_overrides, held_run, run_figures

pytestmark = pytest.mark.slow

# One Hydra option per case, each with its own seed so that each is a cell of its own (a key
# given on the command line would override the cases' own).
CASES = {
    # An existing folder passes validation; loading a model from it fails in the cell.
    "raises": "model:\n  source: {broken}\n  tokenizer: byte\ntrain:\n  seed: 1\n"
              "  max_steps: 3\n",
    # Batches of 400 fixture dialogues need a few GiB more address space than loading does.
    "over_limit": "runner:\n  cpu_memory_limit_mib: 4000\ntrain:\n  batch_size: 400\n"
                  "  seed: 2\n  max_steps: 3\n",
    # Killed from outside while it waits at the pause point after its first step.
    "killed": "train:\n  max_steps: 5\n  seed: 3\n",
    "ok": "train:\n  seed: 4\n  max_steps: 3\n",
}


def _write_cases(folder, broken):
    cases = folder / "case"
    cases.mkdir(parents=True)
    for name, body in CASES.items():
        (cases / f"{name}.yaml").write_text("# @package _global_\n"
                                            + body.format(broken=broken))


def _sweep(tmp_path, experiment, *overrides, pauses: Pauses | None = None):
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "-m", *overrides, "eval.max_samples=4",
         *folder_store_overrides(tmp_path, experiment)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=pauses and pauses.environment)


def test_failures_inside_a_sweep_end_with_their_status_and_spare_the_others(tmp_path,
                                                                            fault_figures):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    _write_cases(tmp_path / "conf", broken)
    pauses = Pauses(tmp_path / "pauses", hold=("train",))
    sweep = _sweep(tmp_path, "isolation", f"hydra.searchpath=[file://{tmp_path}/conf]",
                   "+case=raises,over_limit,killed,ok", pauses=pauses)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        [held] = pauses.caught("train", sweep, seed=3)
        held_run(client, "isolation", seed=3)  # what it logged is in the store
        os.kill(held["pid"], signal.SIGKILL)
        pauses.go("train")  # the cell after it
        output, _ = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    # A sweep whose cells did not all end ok exits with its most severe cell's code, failed's,
    # after its summary.
    assert sweep.returncode == 3, output[-3000:]
    assert "summary of isolation" in output and "exit 3: not every cell ended ok" in output
    assert "leaked semaphore" not in output  # the killed cell held no semaphore

    experiment = client.get_experiment_by_name("isolation")
    runs = {run.data.params["train.seed"]: run
            for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 4
    assert all(run.info.status != "RUNNING" for run in runs.values())
    outcome = {seed: (run.data.tags["status"], run.info.status) for seed, run in runs.items()}
    assert outcome == {"1": ("failed", "FAILED"), "2": ("oom", "FAILED"),
                       "3": ("failed", "FAILED"), "4": ("ok", "FINISHED")}

    raised = runs["1"].data.tags["status_reason"]
    # transformers' own error for a folder without a model's config.json names the folder.
    assert str(broken) in raised and raised.startswith("load: ValueError: Unrecognized model")
    over = runs["2"].data.tags["status_reason"]
    assert over.startswith("train: out of memory: ") and "last sampled at" in over
    assert runs["3"].data.tags["status_reason"] == "train: the cell process was killed by SIGKILL"
    # The killed cell keeps what it logged, and the runner still records its memory.
    killed = runs["3"]
    assert "train_loss" in killed.data.metrics and killed.data.metrics["cpu_train_peak_mib"] > 0
    assert "memory_trace.csv" in {a.path for a in client.list_artifacts(killed.info.run_id)}
    assert runs["4"].data.metrics["rouge1"] >= 0
    fault_figures.update(fault="cells that raise, run out of memory and are SIGKILLed, in one "
                               "sweep",
                         checked="each ends with its status (failed, oom, failed) and reason, "
                                 "the killed one keeps its metrics and memory trace, the last "
                                 "finishes ok",
                         **run_figures(list(runs.values()), started=4))


def test_an_interrupted_sweep_reruns_only_what_did_not_finish(tmp_path):
    grid = ["train.seed=1,2", "train.max_steps=5"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    pauses = Pauses(tmp_path / "pauses", hold=("train",))
    sweep = _sweep(tmp_path, "resume", *grid, pauses=pauses)
    try:
        pauses.caught("train", sweep, seed=2)  # cell 1 is let go and finishes
        interrupted = held_run(client, "resume", seed=2)
        sweep.send_signal(signal.SIGINT)  # Ctrl-C while cell 2 trains
        sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    experiment = client.get_experiment_by_name("resume").experiment_id
    first = {run.data.params["train.seed"]: run for run in client.search_runs([experiment])}
    assert (first["1"].data.tags["status"], first["1"].info.status) == ("ok", "FINISHED")
    killed = client.get_run(interrupted.info.run_id)
    assert (killed.data.tags["status"], killed.info.status) == ("killed", "KILLED")
    assert re.match(r"train: interrupted\b", killed.data.tags["status_reason"])
    assert "train_loss" in killed.data.metrics  # what it had logged stays

    rerun = _sweep(tmp_path, "resume", *grid)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    assert "already ok" in output
    runs = client.search_runs([experiment])
    assert sorted((r.data.params["train.seed"], r.data.tags["status"]) for r in runs) == [
        ("1", "ok"), ("2", "killed"), ("2", "ok")]
    assert first["1"].info.run_id in {run.info.run_id for run in runs}
    assert all(run.info.status != "RUNNING" for run in runs)


def test_a_terminated_run_ends_killed_with_its_memory_trace_and_runs_again(tmp_path,
                                                                           fault_figures):
    # kill, timeout and schedulers send SIGTERM: handled as Ctrl-C is, not left RUNNING.
    pauses = Pauses(tmp_path / "pauses", hold=("train",))
    run = subprocess.Popen([sys.executable, "-m", "harness", "train.max_steps=5",
                            *folder_store_overrides(tmp_path, "terminated")],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=pauses.environment)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        pauses.caught("train", run)
        training = held_run(client, "terminated", seed=42)
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "[harness] stopped by SIGTERM" in output and "Traceback" not in output
    killed = client.get_run(training.info.run_id)
    assert (killed.data.tags["status"], killed.info.status) == ("killed", "KILLED")
    assert killed.data.tags["status_reason"].startswith("train: stopped by SIGTERM (kill, "
                                                        "timeout or a scheduler)")
    assert "memory_trace.csv" in {a.path for a in client.list_artifacts(killed.info.run_id)}
    assert killed.data.metrics["cpu_train_peak_mib"] > 0
    # A rerun runs the cell again: it did not finish.
    assert finished_run(client, killed.info.experiment_id,
                                 killed.data.tags["cell"]) is None
    fault_figures.update(fault="SIGTERM to a single run mid-training",
                         checked="the run ends KILLED with its reason and memory trace; a rerun "
                                 "runs the cell again", **run_figures([killed], started=1),
                         train_steps_kept=len(client.get_metric_history(killed.info.run_id,
                                                                        "train_loss")))


HEAD_START = """
import json, sys, time
import psutil
from harness.run import process
process.head_start(sys.argv[1])
assert "torch" not in sys.modules
# The server's pid, as multiprocessing records it: a child's command line can still be this
# process's own for a moment between fork and exec on a busy machine.
from multiprocessing import forkserver
server = forkserver._forkserver._forkserver_pid
servers = [child.pid for child in psutil.Process().children() if child.pid == server]
import torch
cell = process.context(sys.argv[1], torch.cuda.is_available()).Process(
    target=time.sleep, args=(2,))
cell.start()
print(json.dumps({"servers": len(servers),
                  "forked_from_it": psutil.Process(cell.pid).ppid() in servers}))
cell.join()
"""


@pytest.mark.parametrize("start_method", ["auto", "spawn"])
def test_the_cells_server_starts_before_torch_loads_and_the_cell_forks_from_it(start_method):
    # Without a GPU, `auto` forks each cell from a server that imports torch and transformers
    # once; started before the runner imports them, the two load side by side.
    from harness.run.process import _nvml_finds_a_gpu

    forks = start_method == "forkserver" or (start_method == "auto" and not _nvml_finds_a_gpu())
    result = subprocess.run([sys.executable, "-c", HEAD_START, start_method], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout)
    assert seen == {"servers": int(forks), "forked_from_it": forks}
