"""MLflow's write side: one run per cell, named as the contract of docs/design.md says (params,
metrics, tags, artifacts); the read side is harness/tracking/runs.py.

The runner alone writes to MLflow: it claims the cell's run (harness/tracking/claims.py), writes
the metrics, tags and artifacts the cell process sends it as they arrive (so nothing finished is
lost if the cell dies later), adds the memory the sampler saw, and closes the run with the
outcome; everything after the claim goes through the run's journal (harness/tracking/journal.py),
so that nothing is lost when the store does not answer.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
import urllib.parse
from importlib.metadata import version
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag
from mlflow.exceptions import MlflowException

from harness.core.errors import ConfigError
from harness.core.outcome import STATUSES
from harness.data.sources import from_hub

# The MLflow UI opens such an experiment on its runs table (model training), not on GenAI traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def connect(tracking_cfg, create: bool = True) -> tuple[MlflowClient | None, str | None]:
    """The client and the id of the experiment named by tracking.experiment (created if new;
    without `create`, None, and no client for an sqlite store that does not exist). A tracking
    server that does not answer is a ConfigError, before any cell runs."""
    if tracking_cfg.uri.startswith(("http://", "https://")):
        check_server(tracking_cfg.uri)
    store = Path(tracking_cfg.uri.removeprefix("sqlite:///"))
    if not create and tracking_cfg.uri.startswith("sqlite:///") and not store.exists():
        return None, None  # no store yet: nothing in it, and nothing to create
    # Two sweeps opening a new store at once would each create its tables and collide: the
    # first creates them under the lock, the other finds them; likewise the experiment.
    with store_lock(tracking_cfg.uri):
        client = MlflowClient(tracking_cfg.uri)
        try:
            client.search_experiments(max_results=1)
        except MlflowException as error:
            if error.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED") \
                    or "401" in str(error) or "403" in str(error):
                raise ConfigError(
                    f"tracking.uri={tracking_cfg.uri} refused "
                    + ("the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
                       if os.environ.get("MLFLOW_TRACKING_USERNAME") else "a client without "
                       "credentials") + f" ({error.error_code}): it runs with authentication; "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account "
                    "of the server's (its admin can create one)") from None
            raise
        experiment = client.get_experiment_by_name(tracking_cfg.experiment)
        if experiment is None and not create:
            return client, None
        if experiment is None:
            try:
                experiment = client.get_experiment(client.create_experiment(
                    tracking_cfg.experiment, artifact_location=tracking_cfg.artifact_location,
                    tags=EXPERIMENT_TAGS))
            except MlflowException as error:  # another sweep created it since: a server's race
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(tracking_cfg.experiment)
        if create:  # its runs will write there: refused now, before any run exists
            _check_artifact_location(experiment)
        return client, experiment.experiment_id


def _check_artifact_location(experiment) -> None:
    """ConfigError where the experiment keeps its artifacts in a local folder this user cannot
    write in (a server's or a cloud's location answers for itself)."""
    parts = urllib.parse.urlsplit(experiment.artifact_location)
    if parts.scheme not in ("", "file"):
        return
    folder = Path(urllib.parse.unquote(parts.path))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"experiment {experiment.name!r} keeps its artifacts in {folder}, where this user "
            f"cannot write ({type(error).__name__}: {error.strerror}); run from a folder you can "
            "write in (a new experiment's artifacts go to ./mlruns), fix the permissions, or "
            "log to a new experiment with tracking.artifact_location=/a/folder/you/own") from None


@contextlib.contextmanager
def store_lock(uri: str):
    """The block alone among the processes of this machine using the sqlite store `uri` (a lock
    file beside it); a no-op for a server, which has transactions of its own."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Ask the server's /health once: MLflow's own client would retry for minutes first."""
    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
        answer.raise_for_status()
    except requests.RequestException as error:
        raise ConfigError(
            f"tracking.uri={uri} does not answer ({type(error).__name__}: {error}); start the "
            "server (make server), fix tracking.uri, or log to a local file with "
            "tracking=local") from None


def start_run(client: MlflowClient, experiment_id: str, name: str, params: dict, tags: dict,
              config_yaml: str) -> str:
    try:
        run = client.create_run(experiment_id, run_name=name, tags=tags)
    except MlflowException as error:
        if error.error_code == "PERMISSION_DENIED" or "403" in str(error):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "anonymous")
            experiment = client.get_experiment(experiment_id).name
            raise ConfigError(
                f"user {user!r} may not write to experiment {experiment!r} on "
                f"{client.tracking_uri} (the server answered PERMISSION_DENIED): ask its owner or "
                "the admin for EDIT on it, or log to an experiment of your own "
                "(tracking.experiment=<a new name>)") from None
        raise
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
        client.log_text(run_id, config_yaml, "config.yaml")
    except Exception:
        client.delete_run(run_id)  # a run that could not start is not left RUNNING
        raise
    return run_id


def end_run(journal, status: str, reason: str = "") -> None:
    """Record the outcome and close the run (through its journal): never left RUNNING."""
    journal.tags(outcome_tags(status, reason))
    journal.end(STATUSES[status].run_status)


def close(client: MlflowClient, run_id: str, status: str, reason: str,
          end_time_ms: int | None = None) -> None:
    """end_run() straight into the store, for a run whose runner is gone."""
    client.log_batch(run_id, tags=[RunTag(key, value)
                                   for key, value in outcome_tags(status, reason).items()])
    client.set_terminated(run_id, STATUSES[status].run_status, end_time_ms)


def outcome_tags(status: str, reason: str) -> dict:
    """status and status_reason; a run that did not end ok says why in its description too,
    which the MLflow UI shows on the run's page and in the runs table's Description column
    (plain text: the table does not render markdown)."""
    tags = {"status": status}
    if reason:
        tags["status_reason"] = reason[:5000]
    if status != "ok":
        tags["mlflow.note.content"] = status + (f": {reason}" if reason else "")
    return tags


# What the adapter's MLflow model needs installed, at the versions that made it (and mlflow, by
# its module's version: where only its client is installed, mlflow-skinny, no "mlflow" package is).
MODEL_REQUIREMENTS = ("torch", "transformers", "peft", "omegaconf", "datasets", "pandas", "numpy")


def log_adapter_model(client: MlflowClient, experiment_id: str, run_id: str,
                      tracking_uri: str, adapter: Path, model_config: dict) -> str:
    """The run's LoRA adapter as an MLflow model (harness/tracking/adapter_model.py), linked to the
    run (the UI's Models column); its id."""
    from harness.tracking import (
        adapter_model,  # its module imports mlflow.pyfunc, only needed here
    )

    logged = client.create_logged_model(experiment_id, name="adapter", source_run_id=run_id)
    mlflow.set_tracking_uri(tracking_uri)  # log_model writes through MLflow's fluent API
    mlflow.pyfunc.log_model(
        name="adapter", python_model=adapter_model.__file__, model_id=logged.model_id,
        artifacts={"adapter": str(adapter)}, model_config=model_config,
        code_paths=[str(Path(adapter_model.__file__).parents[1])],  # the whole harness package
        pip_requirements=[*(f"{package}=={version(package).split('+')[0]}"
                            for package in MODEL_REQUIREMENTS), f"mlflow=={mlflow.__version__}"])
    return logged.model_id


# MLflow's names for what a dataset was used for.
CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}


def log_datasets(journal, data_cfg, rows: dict, identity: str) -> None:
    """The splits the cell used as the run's dataset inputs (the UI's Dataset column): name,
    source, a digest of what they hold (`identity`: the data config, tokenizer and cuts), rows."""
    inputs = []
    for split, count in rows.items():
        source_type, source = _dataset_source(data_cfg, split)
        inputs.append({"name": f"{data_cfg.name}-{split}", "source_type": source_type,
                       "digest": hashlib.sha256(f"{identity}|{split}|{count}".encode())
                       .hexdigest()[:8], "source": source,
                       "profile": json.dumps({"num_rows": count}), "context": CONTEXTS[split]})
    journal.inputs(inputs)


def log_inputs(client: MlflowClient, run_id: str, datasets: list[dict]) -> None:
    """Dataset inputs, as log_datasets() described them, into the run."""
    inputs = [DatasetInput(Dataset(name=found["name"], digest=found["digest"],
                                   source_type=found["source_type"], source=found["source"],
                                   profile=found["profile"]),
                           tags=[InputTag("mlflow.data.context", found["context"])])
              for found in datasets]
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as error:
            # Cells of a parallel sweep log the same dataset at once; the store keeps one row
            # per dataset, and the insert that loses the race fails: the row exists now.
            if "UNIQUE" not in str(error) or attempt == 2:
                raise
            time.sleep(0.5)


def _dataset_source(data_cfg, split: str) -> tuple[str, str]:
    """(source type, source) as MLflow records them: the hub's dataset, a local file or folder,
    or the harness's own generator (fixture, synthetic)."""
    if from_hub(data_cfg):
        hub = HuggingFaceDatasetSource(path=data_cfg.hub_id, config_name=data_cfg.get("subset"),
                                       revision=data_cfg.revision,
                                       split=split)
        return hub._get_source_type(), hub.to_json()
    if data_cfg.name == "local":
        return "local", json.dumps({"uri": str(Path(data_cfg.path).resolve())})
    generated = CodeDatasetSource(tags={"generator": f"harness data={data_cfg.name}",
                                        "seed": str(data_cfg.seed)})
    return generated._get_source_type(), generated.to_json()
