"""Shared test helpers: real Hydra composition of conf/, and a real sqlite MLflow store."""

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from harness.core import pauses
from harness.measure import gpus
from harness.server import JOBS_VARIABLE

REPO = Path(__file__).resolve().parents[1]

def pytest_collection_modifyitems(items):
    """A test that reads the published experiments' plans (`published_plans`: three plans
    simulated cold, about 50 s) is slow."""
    for item in items:
        if "published_plans" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The committed plans (reports/<name>/plan.csv) fit against their experiment's plan_gpu, as a
# machine without a GPU writes them; one with a GPU fits against its own.
without_a_gpu = pytest.mark.skipif(bool(gpus.describe(gpus.candidates(None))),
                                   reason="the committed plans are a machine's without a GPU")


def compose_cell(*overrides: str):
    """The config `python -m harness <overrides>` would run, composed by Hydra (with the schema
    registered, as the command's imports register it)."""
    from harness.config import schema  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A real sqlite MLflow store with its artifact folder, shared by the session's tests."""
    folder = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{folder}/mlflow.db", "artifacts": str(folder / "artifacts"),
            "cache": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture
def cell_overrides(store, request):
    """Overrides that send a cell to the test store, in an experiment named after the test."""
    experiment = request.node.name.replace("[", "-").replace("]", "")
    return [f"tracking.uri={store['uri']}", f"tracking.experiment={experiment}",
            f"tracking.artifact_location={store['artifacts']}/{experiment}",
            f"tracking.journal_dir={store['artifacts']}/journal", f"cache_dir={store['cache']}"]


def folder_store_overrides(folder, experiment: str, new_store: bool = False) -> list[str]:
    """Overrides that send `python -m harness` to an sqlite store and cache inside `folder`. The
    store starts as a copy of an empty one MLflow has made (its schema's migrations cost every new
    store about 2 s); with `new_store`, the harness makes it, as on a user's first run."""
    store = Path(folder) / "mlflow.db"
    if not new_store and not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), store)
    return [f"tracking.uri=sqlite:///{folder}/mlflow.db", f"tracking.experiment={experiment}",
            f"tracking.artifact_location={folder}/artifacts",
            f"tracking.journal_dir={folder}/journal", f"cache_dir={folder}/cache"]


@functools.lru_cache(maxsize=1)
def _empty_store() -> Path:
    """An sqlite store that MLflow has created and migrated, holding no run (made once per test
    session)."""
    folder = Path(tempfile.mkdtemp(prefix="harness-empty-store-"))
    atexit.register(shutil.rmtree, folder, True)
    # Made in its own folder, where the store's default experiment keeps its artifacts.
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient("
                    f"'sqlite:///{folder}/mlflow.db').search_experiments()"],
                   cwd=folder, check=True, capture_output=True)
    return folder / "mlflow.db"


def run_harness(cwd, *args: str, timeout: int = 600,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in `cwd`, as a user types it (in `env`, else this process's)."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=env)


def runs_of(store, experiment: str):
    client = MlflowClient(store["uri"])
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def held_run(client, experiment, seed, timeout_s=120):
    """The run of the cell with this train.seed while the cell is held at a pause point (tests'
    `Pauses`), once what it logged before the point is in the store: its pid tag and train_loss
    (the runner's journal delivers them within a second or so, the cell being held meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = [] if found is None else client.search_runs(
            [found.experiment_id], f"params.`train.seed` = '{seed}' and "
                                   "attributes.status = 'RUNNING'")
        if runs and "train_loss" in runs[0].data.metrics and "pid" in runs[0].data.tags:
            return runs[0]
        assert time.monotonic() < deadline, f"the held cell of seed {seed} has no run in the store"
        time.sleep(0.2)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_serving(command: str, backend_store_uri: str, log_path: Path, *options: str,
                   port: int | None = None, stop_signal: int = signal.SIGTERM):
    """`mlflow server` or `mlflow ui` on `port` (else a free loopback port), until the block
    ends; yields its address once it answers /health. Then `stop_signal` goes to it and its
    workers (SIGKILL: the server dies outright, as in a crash)."""
    port = port or free_port()
    with open(log_path, "a") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", command, "--backend-store-uri",
                                   backend_store_uri, "--host", "127.0.0.1", "--port", str(port),
                                   *options], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True,  # its workers in its process group
                                  env=without_server_jobs(os.environ))
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(address, server, lambda: log_path.read_text()[-2000:])
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, stop_signal)
        server.wait(timeout=30)


def without_server_jobs(environment) -> dict:
    """`environment` with MLflow's server job runner off, as `make server` and `make ui` start
    the server (harness/server.py says why)."""
    return {JOBS_VARIABLE: "false", **environment}


def wait_until_answering(address: str, server: subprocess.Popen, log) -> None:
    """Until the server at `address` answers /health; RuntimeError with `log()` where it exits
    first or takes over two minutes."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{address}/health", timeout=5).ok:
                return
        # Not listening yet, or too busy starting to answer (a loaded 2-core machine): ask
        # again until the deadline.
        except (requests.ConnectionError, requests.Timeout):
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server at {address} did not start: {log()}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def postgres_database():
    """A new PostgreSQL database for the session's tests (HARNESS_TEST_POSTGRES: an admin URI;
    .ci/run starts the server), dropped afterwards."""
    admin_uri = os.environ.get("HARNESS_TEST_POSTGRES")
    if not admin_uri:
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: .ci/services.sh exports HARNESS_TEST_POSTGRES")
        pytest.skip("no PostgreSQL: run `eval \"$(bash .ci/services.sh)\"` first")
    import psycopg

    name = f"harness_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_uri, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield admin_uri.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin_uri, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def mlflow_server(postgres_database, tmp_path_factory):
    """`mlflow server` on a free loopback port, PostgreSQL behind it, artifacts it serves; one
    for the session (its tests use experiments of their own)."""
    folder = tmp_path_factory.mktemp("server")
    with mlflow_serving("server", postgres_database, folder / "server.log",
                        "--artifacts-destination", str(folder / "served-artifacts"),
                        "--workers", "1") as address:
        yield address


@pytest.fixture
def fault_figures(request):
    """What the test checked and measured, for reports/faults.md (HARNESS_FAULTS_OUT: the json
    lines file `make faults` collects them in)."""
    found = {}
    yield found
    out = os.environ.get("HARNESS_FAULTS_OUT")
    if out and found:
        with open(out, "a") as file:
            file.write(json.dumps({"test": request.node.name, **found}) + "\n")


def run_figures(runs: list, started: int) -> dict:
    """What a fault case reports of its runs: how many it started, how many ended with a
    status, how many are left RUNNING, and how many were lost (started, never ended)."""
    ended = sum(run.info.status != "RUNNING" and "status" in run.data.tags for run in runs)
    return {"runs_started": started, "runs_finished": ended,
            "runs_left_running": sum(run.info.status == "RUNNING" for run in runs),
            "lost": started - ended}


@pytest.fixture(scope="session")
def reference_plan(tmp_path_factory):
    """`make plan EXP=reference_table`, as a user runs it, in a folder of its own: (stdout, the
    plan, the file written, the folder, whose cache_dir holds the simulations)."""
    folder = tmp_path_factory.mktemp("plan")
    result = subprocess.run([sys.executable, "-m", "harness.plan", "reference_table",
                             f"cache_dir={folder}/cache", f"tracking.uri=sqlite:///{folder}/m.db"],
                            cwd=folder, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    written = folder / "reports" / "reference_table" / "plan.csv"
    # Its simulations show their progress: how many are done, and the cell.
    assert "estimating: 100%" in result.stderr and "flan-t5-" in result.stderr
    return result.stdout, pd.read_csv(written), written, folder


@pytest.fixture(scope="session")
def demo_sweep(tmp_path_factory):
    """`make demo` narrowed to t5-tiny and a few steps, run once for the session's tests (the
    command line's tests and the UI's): (the finished process, the folder whose mlflow.db holds
    experiment demo)."""
    folder = tmp_path_factory.mktemp("demo")
    result = run_harness(folder, "-cd", str(REPO / "experiments"), "-cn", "demo",
                         "model=t5-tiny", "train.max_steps=3", "eval.max_samples=4",
                         *folder_store_overrides(folder, "demo"))
    return result, folder


@pytest.fixture(scope="session")
def published_plans(tmp_path_factory):
    """The plans of the experiments with published tables, as `make plan` writes them with an
    empty cache and store, simulated once for the session."""
    from harness.config import grids
    from harness.sweep import plan

    cache = tmp_path_factory.mktemp("plans")
    return {name: plan.plan(grids.compose_experiment(name, [f"cache_dir={cache}"]), [],
                            grids.compose_experiment(name, [])[0].plan_gpu,
                            create_experiment=False)
            for name in ("peft_table", "opencalm", "lomo_table")}



class Pauses:
    """The test's side of harness/core/pauses.py: a process started with `environment` waits at
    each point of `hold` until the test lets it go, so that a test catches a cell at that moment
    on any machine, fast or slow. The other points are let go from the start."""

    def __init__(self, folder: Path, hold: tuple[str, ...] = pauses.POINTS):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.environment = {**os.environ, pauses.ENVIRONMENT: str(folder)}
        self.seen: set[Path] = set()
        for point in set(pauses.POINTS) - set(hold):
            self.go(point)

    def caught(self, point: str, process: subprocess.Popen, seed: int | None = None,
               ranks: int = 1, timeout_s: float = 600) -> list[dict]:
        """Who waits at `point` (pid, seed, rank; one per rank, in rank order) of the cell whose
        train.seed is `seed` (any cell's where None), once all `ranks` do. A process of another
        cell that waits there is let go. AssertionError where `process` ends first, or none gets
        there within `timeout_s` (a hung process)."""
        held, deadline = [], time.monotonic() + timeout_s
        while len(held) < ranks:
            for record in sorted(self.folder.glob(f"{point}.*.reached")):
                if record in self.seen:
                    continue
                self.seen.add(record)
                who = json.loads(record.read_text())
                if seed is None or who["seed"] == seed:
                    held.append(who)
                else:
                    self.go(point, who["pid"])
            if len(held) == ranks:
                break
            if process.poll() is not None:
                raise AssertionError(f"the process ended (code {process.returncode}) before "
                                     f"pause point {point}")
            assert time.monotonic() < deadline, f"no process reached {point} in {timeout_s} s"
            time.sleep(pauses.LOOK_EVERY_S)
        return sorted(held, key=lambda who: who["rank"])

    def go(self, point: str, pid: int | None = None) -> None:
        """Let the process `pid` go on from `point`, or every process where None (from now on,
        none waits there)."""
        (self.folder / (f"{point}.go" if pid is None else f"{point}.{pid}.go")).touch()
