"""How a journal's entries reach the store (harness/tracking/journal.py): one entry's write (or
consecutive metrics entries together), and, after a failure or in a replay, the same write less
what the store holds already, so that nothing arrives twice.
"""

import contextlib
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from harness.tracking import mlflow_store

# MLflow's answers that no retry changes: the entry is rejected, and delivery goes on. (Refused
# credentials are not among them: the entries wait for the right ones, `make sync` included.)
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
            "INVALID_STATE", "BAD_REQUEST"}
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch request


def rejected(error: Exception) -> bool:
    """Whether the store answered and refused (no retry changes that), rather than not answered."""
    return isinstance(error, MlflowException) and error.error_code in REJECTED


def next_batch(entries: list, delivered: int) -> list:
    """The next entries to deliver: consecutive metrics entries together (up to a request's
    worth), anything else alone."""
    batch = [entries[delivered]]
    if batch[0]["op"] == "metrics":
        count = len(batch[0]["metrics"])
        for entry in entries[delivered + 1:]:
            if entry["op"] != "metrics" or count + len(entry["metrics"]) > METRICS_PER_BATCH:
                break
            batch.append(entry)
            count += len(entry["metrics"])
    return batch


def deliver(client: MlflowClient, run_id: str, folder: Path, batch: list,
            checked: bool) -> None:
    """Write `batch` (one entry, or metrics entries) into the run; `checked`: leave out what the
    store holds already."""
    entry = batch[0]
    op = entry["op"]
    if op == "metrics":
        metrics = [Metric(key, value, timestamp, step) for each in batch
                   for key, value, timestamp, step in each["metrics"]]
        if checked:
            metrics = _new_metrics(client, run_id, metrics)
        if metrics:
            client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif op == "params":
        params = entry["params"]
        if checked:
            stored = client.get_run(run_id).data.params
            params = {key: value for key, value in params.items() if stored.get(key) != value}
        if params:
            client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()],
                             synchronous=True)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in entry["tags"].items()],
                         synchronous=True)
    elif op == "artifact":
        _log_artifact(client, run_id, folder / entry["path"], entry["folder"], checked)
    elif op == "text":
        if not (checked and _stored(client, run_id, entry["name"])):
            client.log_text(run_id, entry["text"], entry["name"])
    elif op == "inputs":
        if not (checked and client.get_run(run_id).inputs.dataset_inputs):
            mlflow_store.log_inputs(client, run_id, entry["datasets"])
    elif op == "adapter_model":
        if not (checked and _has_adapter_model(client, entry["experiment_id"], run_id)):
            mlflow_store.log_adapter_model(client, entry["experiment_id"], run_id,
                                           client.tracking_uri, folder / entry["path"],
                                           entry["model_config"])
    elif op == "end":
        client.set_terminated(run_id, entry["status"], entry["end_time"])
    else:
        raise ValueError(f"journal entry {entry['seq']} of run {run_id}: unknown op {op!r}")


def _new_metrics(client: MlflowClient, run_id: str, metrics: list) -> list:
    """The metrics the run does not hold yet (by key, step, timestamp and value)."""
    stored = {}
    for key in {metric.key for metric in metrics}:
        stored[key] = {(m.step, m.timestamp, m.value)
                       for m in client.get_metric_history(run_id, key)}
    return [metric for metric in metrics
            if (metric.step, metric.timestamp, metric.value) not in stored[metric.key]]


def _log_artifact(client: MlflowClient, run_id: str, local: Path, folder: str | None,
                  checked: bool) -> None:
    """A file (into `folder`), or, as MlflowClient.log_artifacts does, a folder's files (its
    contents into `folder`), unless (`checked`) the run has each at its path."""
    if local.is_dir():
        for file in sorted(path for path in local.rglob("*") if path.is_file()):
            inside = file.parent.relative_to(local).as_posix()
            target = "/".join(part for part in (folder, inside) if part and part != ".")
            _log_artifact(client, run_id, file, target or None, checked)
        return
    if checked and _stored(client, run_id, "/".join(filter(None, (folder, local.name)))):
        return
    client.log_artifact(run_id, str(local), folder)


def _stored(client: MlflowClient, run_id: str, path: str) -> bool:
    """Whether the run has an artifact at `path`."""
    parent = path.rsplit("/", 1)[0] if "/" in path else None
    with contextlib.suppress(OSError, MlflowException):
        return any(found.path == path for found in client.list_artifacts(run_id, parent))
    return False


def _has_adapter_model(client: MlflowClient, experiment_id: str, run_id: str) -> bool:
    found = client.search_logged_models([experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'")
    return any(model.name == "adapter" and str(model.status).endswith("READY")
               for model in found)
