"""`make server` beyond loopback, for real: MLflow's basic-auth app with an admin password made on
first start and readable by its owner alone, refusing what comes without credentials, and a cell
that logs with MLflow's own credential variables."""

import os
import stat
import subprocess
import sys
import time

import psutil
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
        # Without MLflow's job runner (its consumers: seven processes of about 200 MiB).
        processes = psutil.Process(serving.pid).children(recursive=True)
        assert processes and not [process for process in processes
                                  if "huey" in " ".join(process.cmdline())]
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


@pytest.mark.parametrize("options, says", [
    (["--host", "0.0.0.0"], "--host among the mlflow options"),
    (["-h", "0.0.0.0"], "-h among the mlflow options"),
    (["--app-name", "basic-auth"], "--app-name among the mlflow options"),
    (["--port=5001"], "give it as PORT="),
    (["--gunicorn-opts", "--bind 0.0.0.0:5000"], "--gunicorn-opts binds the server itself"),
    (["--uvicorn-opts=--host 0.0.0.0"], "--uvicorn-opts binds the server itself"),
])
def test_server_options_cannot_set_again_what_the_harness_sets(options, says, tmp_path):
    # `make server HOST=127.0.0.1 ARGS="--host 0.0.0.0"` once bound every interface without
    # authentication: the second --host won.
    started = subprocess.run([sys.executable, "-m", "harness.server", "--host", "127.0.0.1",
                              "--backend-store-uri", f"sqlite:///{tmp_path}/s.db", "--",
                              *options], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and says in started.stderr, started.stderr
    assert "Traceback" not in started.stderr


def test_an_unreachable_postgresql_is_refused_within_seconds_its_password_masked():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness.server", "--backend-store-uri",
                           f"postgresql://harness:s3cret-pass@127.0.0.1:{free_port()}/harness"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - started < 10
    assert "postgresql://harness:***@127.0.0.1:" in done.stderr and "s3cret" not in done.stderr
    assert "pg_ctlcluster" in done.stderr and "Traceback" not in done.stderr


UI_READS = [  # what the MLflow UI asks while a colleague browses an experiment (MLflow 3)
    ("/ajax-api/2.0/mlflow/experiments/search", {"max_results": 25}),
    ("/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": ["{id}"]}),
    ("/ajax-api/3.0/mlflow/datasets/search", {"experiment_ids": ["{id}"],
                                              "order_by": ["created_time DESC"],
                                              "max_results": 50}),
    ("/ajax-api/2.0/mlflow/logged-models/search", {"experiment_ids": ["{id}"]}),
    ("/ajax-api/2.0/mlflow/experiments/search-datasets", {"experiment_ids": ["{id}"]}),
]


@pytest.mark.slow
def test_the_servers_doors(tmp_path):
    """Secrets readable by their owner alone (also a folder that existed wider), a read-only
    colleague who browses what the UI shows but whose writes are refused in JSON and by the
    harness in one line, and an admin password that rotates."""
    secrets, port = tmp_path / "secrets", free_port()
    secrets.mkdir(mode=0o755)
    secrets.chmod(0o755)
    address = f"http://127.0.0.1:{port}"
    serving = _serve(tmp_path, secrets, port)
    try:
        wait_until_answering(address, serving, lambda: serving.stdout.read()[-3000:])
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in secrets.iterdir()}
        assert set(modes) >= {"admin-password", "flask-secret-key", "basic_auth.ini",
                              "basic_auth.db"} and set(modes.values()) == {0o600}, modes
        old = (secrets / "admin-password").read_text().strip()
        admin, bob = ("admin", old), ("bob", "bob-password-123")
        assert requests.post(f"{address}/api/2.0/mlflow/users/create", auth=admin, timeout=10,
                             json={"username": bob[0], "password": bob[1]}).ok
        experiment = requests.post(f"{address}/api/2.0/mlflow/experiments/create", auth=admin,
                                   json={"name": "admins"}, timeout=10).json()["experiment_id"]
        requests.post(f"{address}/api/2.0/mlflow/runs/create", auth=admin, timeout=10,
                      json={"experiment_id": experiment, "start_time": int(time.time() * 1000)}
                      ).raise_for_status()
        for path, body in UI_READS:
            body = {key: [experiment] if value == ["{id}"] else value
                    for key, value in body.items()}
            answer = requests.post(address + path, json=body, auth=bob, timeout=10)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
        refused = requests.post(f"{address}/api/2.0/mlflow/runs/create", auth=bob, timeout=10,
                                json={"experiment_id": experiment})
        assert refused.status_code == 403
        assert refused.json()["error_code"] == "PERMISSION_DENIED" and "'bob'" in \
            refused.json()["message"]
        # The harness run as bob: one line that says who may not write where, and no run.
        done = subprocess.run(
            [sys.executable, "-m", "harness", "tracking=server", f"tracking.uri={address}",
             "tracking.experiment=admins", f"cache_dir={tmp_path}/cache", *QUICK],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "MLFLOW_TRACKING_USERNAME": bob[0],
                 "MLFLOW_TRACKING_PASSWORD": bob[1]})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "user 'bob' may not write to experiment 'admins'" in done.stderr
        runs = requests.post(f"{address}/api/2.0/mlflow/runs/search", auth=admin, timeout=10,
                             json={"experiment_ids": [experiment]}).json()["runs"]
        assert len(runs) == 1  # the admin's own, none of bob's
    finally:
        serving.terminate()
        serving.communicate(timeout=60)

    # Rotation: the password file removed, a new one made at the next start; the old refused.
    (secrets / "admin-password").unlink()
    serving = _serve(tmp_path, secrets, port)
    try:
        wait_until_answering(address, serving, lambda: serving.stdout.read()[-3000:])
        new = (secrets / "admin-password").read_text().strip()
        search = f"{address}/api/2.0/mlflow/experiments/search"
        assert new != old
        assert requests.post(search, json={"max_results": 1}, auth=("admin", new),
                             timeout=10).status_code == 200
        assert requests.post(search, json={"max_results": 1}, auth=("admin", old),
                             timeout=10).status_code == 401
    finally:
        serving.terminate()
        output = serving.communicate(timeout=60)[0]
    assert "the admin's password changed" in output and new not in output
