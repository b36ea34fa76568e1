"""`make server` beyond loopback, for real: MLflow's basic-auth app with an admin password made on
first start and readable by its owner alone, refusing what comes without credentials, and a cell
that logs with MLflow's own credential variables."""

import os
import stat
import subprocess
import sys

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from harness import server
from harness.core.errors import ConfigError
from harness.tracking import mlflow_store
from tests.conftest import REPO, free_port, wait_until_answering

QUICK = ["model=t5-tiny", "method=lora", "train.max_steps=3", "eval.max_samples=4"]


def _serve(tmp_path, secrets, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.server", "--host", "0.0.0.0", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         str(tmp_path / "served"), "--secrets", str(secrets), "--", "--workers", "1"],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={key: value for key, value in os.environ.items()
             if not key.startswith("MLFLOW_AUTH")})


def test_a_password_file_others_can_read_is_refused(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "admin-password").write_text("a-long-enough-password")
    (secrets / "admin-password").chmod(0o644)
    started = _serve(tmp_path, secrets, free_port())
    output, _ = started.communicate(timeout=60)
    assert started.returncode == 2
    assert f"chmod 600 {secrets / 'admin-password'}" in output and "others can read" in output


def test_loopback_needs_no_password_and_other_interfaces_do():
    assert server.loopback("127.0.0.1") and server.loopback("localhost")
    assert server.loopback("::1")
    assert not server.loopback("0.0.0.0") and not server.loopback("10.1.2.3")


@pytest.mark.slow
def test_a_shared_server_refuses_anyone_without_credentials(tmp_path):
    secrets, port = tmp_path / "secrets", free_port()
    serving = _serve(tmp_path, secrets, port)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(address, serving, lambda: serving.stdout.read()[-3000:])
        password_file = secrets / "admin-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= server.MIN_PASSWORD

        # Without credentials: no reads, no writes.
        search = f"{address}/api/2.0/mlflow/experiments/search"
        assert requests.post(search, json={"max_results": 1}, timeout=10).status_code == 401
        create = f"{address}/api/2.0/mlflow/experiments/create"
        assert requests.post(create, json={"name": "x"}, timeout=10).status_code == 401
        assert requests.post(search, json={"max_results": 1}, timeout=10,
                             auth=("admin", "wrong-password-123")).status_code == 401
        with pytest.raises(MlflowException):
            MlflowClient(address).search_experiments()

        # A runner without credentials is refused before any cell; with MLflow's variables a
        # cell logs.
        tracking = OmegaConf.create({"uri": address, "experiment": "shared",
                                     "artifact_location": None})
        with pytest.raises(ConfigError, match="refused a client without credentials .*"
                                              "MLFLOW_TRACKING_USERNAME"):
            mlflow_store.connect(tracking)
        overrides = ["tracking=server", f"tracking.uri={address}", "tracking.experiment=shared",
                     f"cache_dir={tmp_path}/cache", *QUICK]
        with_credentials = subprocess.run(
            [sys.executable, "-m", "harness", *overrides], cwd=tmp_path, text=True,
            capture_output=True, timeout=600,
            env={**os.environ, "MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": password})
        assert with_credentials.returncode == 0, with_credentials.stderr[-3000:]
        runs = requests.post(f"{address}/api/2.0/mlflow/runs/search", timeout=10,
                             auth=("admin", password),
                             json={"experiment_ids": ["1"], "max_results": 10}).json()["runs"]
        assert [run["info"]["status"] for run in runs] == ["FINISHED"]
    finally:
        serving.terminate()
        output = serving.communicate(timeout=60)[0]
    assert password not in output  # never printed in full
    assert f"password in {password_file} ({password[:3]}..." in output
