"""Sweeps at scale, for real: cells in parallel on joblib workers pinned to GPUs, jobs through
submitit's local executor, a shared `mlflow server` on PostgreSQL, and the refusal of a tracking
server that does not answer."""

import re
import time

import pytest
from mlflow import MlflowClient

from harness.report import report
from harness.tracking.runs import finished_run
from tests.conftest import Pauses, folder_store_overrides, free_port, run_harness

pytestmark = pytest.mark.slow

# Tiny cells: what is tested is how they are launched and recorded.
QUICK = ["model=t5-tiny", "method=lora", "train.max_steps=5", "eval.max_samples=4"]


def _finished(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_parallel_joblib_workers_each_hold_their_own_gpu(tmp_path):
    # 4 cells on 2 workers into one new sqlite store; each cell pinned to GPU 0 or 1.
    result = run_harness(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                         "runner.gpus=[0,1]", f"runner.gpu_lock_dir={tmp_path}/locks",
                         *QUICK, "method.r=2,4,8,16", *folder_store_overrides(tmp_path, "par"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _finished(f"sqlite:///{tmp_path}/mlflow.db", "par")
    assert sorted(run.info.run_name for run in runs) == [
        f"t5-tiny/lora-r{r}/fp32" for r in (16, 2, 4, 8)]
    assert {(run.info.status, run.data.tags["status"]) for run in runs} == {("FINISHED", "ok")}
    assert {run.data.tags["gpu"] for run in runs} == {"0", "1"}
    # Two workers ran at once, and never on the same GPU at the same time.
    spans = sorted((run.info.start_time, run.info.end_time, run.data.tags["gpu"]) for run in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    for gpu in ("0", "1"):
        on_gpu = [span for span in spans if span[2] == gpu]
        assert all(later[0] >= earlier[1] for earlier, later in zip(on_gpu, on_gpu[1:]))
    assert "[harness] summary of par:" in result.stdout


def test_submitit_local_executor_runs_each_cell_as_a_job(tmp_path):
    result = run_harness(tmp_path, "-m", "hydra/launcher=submitit_local",
                         "hydra.launcher.timeout_min=10", "hydra.sweep.dir=sweep", *QUICK,
                         "method.r=2,4", *folder_store_overrides(tmp_path, "jobs"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _finished(f"sqlite:///{tmp_path}/mlflow.db", "jobs")
    assert {(run.info.status, run.data.tags["status"]) for run in runs} == {("FINISHED", "ok")}
    assert len(runs) == 2
    # Each cell ran inside a submitit job of its own, whose log shows the cell's progress.
    job_logs = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(job_logs) == 2
    assert all("[harness] cell" in log.read_text() for log in job_logs)


def test_a_job_at_its_time_limit_ends_killed_and_runs_again(tmp_path):
    # submitit's local executor signals a job as SLURM does near its time limit (SIGUSR2, here
    # 30 s before timeout_min), then stops it. The run must say so and keep its memory trace;
    # Hydra's launcher is checkpointable, so submitit requeues the job, which runs the cell
    # again, until it has timed out too often (here once: the local executor's default is 3).
    # Each time the cell is held after its first step (a pause point nobody lets go) until the
    # time limit comes.
    held = Pauses(tmp_path / "pauses", hold=("train",))
    result = run_harness(tmp_path, "-m", "hydra/launcher=submitit_local",
                         "hydra.launcher.timeout_min=1", "+hydra.launcher.max_num_timeout=1",
                         "hydra.sweep.dir=sweep",
                         "model=t5-tiny", "train.max_steps=5", "train.seed=1",
                         *folder_store_overrides(tmp_path, "limits"), timeout=400,
                         env=held.environment)
    assert "timed-out too many times" in result.stderr
    runs = _finished(f"sqlite:///{tmp_path}/mlflow.db", "limits")
    assert len(runs) == 2, result.stdout[-3000:] + result.stderr[-3000:]  # the cell, rerun once
    assert len({run.data.tags["cell"] for run in runs}) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run in runs:
        assert (run.data.tags["status"], run.info.status) == ("killed", "KILLED")
        assert re.match(r"train: the job reached its time limit",
                        run.data.tags["status_reason"])
        assert "memory_trace.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert finished_run(client, runs[0].info.experiment_id,
                                 runs[0].data.tags["cell"]) is None


def test_the_shipped_slurm_launcher_gives_each_cell_one_gpu():
    from tests.test_config import _experiment

    launcher = _experiment("full_grid", "hydra/launcher=slurm", hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.timeout_min >= 360  # the reference's longest cell: 350 min on an A10G
    # A cell across two nodes of four GPUs: a task per node, a GPU per rank.
    launcher = _experiment("full_grid", "hydra/launcher=slurm", "strategy=fsdp",
                           "strategy.nproc_per_node=4", "strategy.nnodes=2",
                           hydra_config=True).hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 1, 2)


def test_cells_log_to_a_shared_server_on_postgresql(mlflow_server, tmp_path):
    result = run_harness(tmp_path, "-m", "tracking=server", f"tracking.uri={mlflow_server}",
                         "tracking.experiment=shared", f"cache_dir={tmp_path}/cache", *QUICK,
                         "method.r=2,4")
    assert result.returncode == 0, result.stderr[-3000:]
    # Read back through the server, as a colleague would.
    client = MlflowClient(mlflow_server)
    runs = _finished(mlflow_server, "shared")
    assert {(run.info.status, run.data.tags["status"]) for run in runs} == {("FINISHED", "ok")}
    assert len(runs) == 2
    for run in runs:
        assert run.data.params["method.name"] == "lora"
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 5
        assert run.data.metrics["cpu_peak_mib"] > 0
        # Artifacts go through the server's own store (mlflow-artifacts:/), not a local folder.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "memory_trace.csv", "memory_trace.png", "predictions.csv",
                "adapter"} <= names
        trace = client.download_artifacts(run.info.run_id, "memory_trace.csv", str(tmp_path))
        assert open(trace).readline().startswith("time_s,phase,")
    # A rerun against the same server finds both cells finished and runs nothing.
    again = run_harness(tmp_path, "-m", "tracking=server", f"tracking.uri={mlflow_server}",
                        "tracking.experiment=shared", f"cache_dir={tmp_path}/cache", *QUICK,
                        "method.r=2,4")
    assert again.returncode == 0 and "0 to run, 0 to skip, 2 done already" in again.stdout
    assert len(_finished(mlflow_server, "shared")) == 2
    # The report reads a server as it reads a file.
    assert report.main(["--experiment", "shared", "--tracking-uri", mlflow_server,
                        "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    results = markdown.split("\n## ", 1)[0]  # the results table, before the sections after it
    assert results.count("| t5-tiny ") == 2 and (tmp_path / "report" / "slides.md").exists()
    assert "## The LoRA paper's claims, here" in markdown


def test_a_tracking_server_that_does_not_answer_is_refused_before_any_cell(tmp_path):
    silent = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    for mode in ([], ["-m"]):  # one cell, and a sweep
        result = run_harness(tmp_path, *mode, "tracking=server", f"tracking.uri={silent}",
                             *QUICK, timeout=120)
        assert result.returncode == 2
        assert f"error: tracking.uri={silent} does not answer" in result.stderr
        assert "make server" in result.stderr
        assert "training" not in result.stderr + result.stdout  # no cell started
    assert time.monotonic() - started < 90  # not MLflow's minutes of retries
