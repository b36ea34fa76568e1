"""The store's one read side: an experiment's runs as one table, in the columns mlflow.search_runs
names them (run_id, start_time, params.<key>, metrics.<key>, tags.<key>), and what is asked of
it. The plan (which cells finished already), the sweep's summary, the report and the GPU check
all read the store here, each once.
"""

import mlflow
import pandas as pd
from mlflow import MlflowClient

from harness.core.errors import ConfigError
from harness.core.outcome import FINISHED, LIVE


def load_runs(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """Every run of the named experiment, oldest first (see experiment_id)."""
    client = MlflowClient(tracking_uri)
    return of_experiment(client, experiment_id(client, experiment))


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """The id of the named experiment. ConfigError naming the experiments the store has where
    it has no such experiment."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no experiment {experiment!r} in {client.tracking_uri}; it has "
                          f"{', '.join(names) or 'none'}: run `make sweep EXP={experiment}` "
                          "first, or pass --tracking-uri")
    return found.experiment_id


def of_experiment(client: MlflowClient, experiment_id: str | None,
                  filter_string: str = "") -> pd.DataFrame:
    """Every run of the experiment (none for None; those `filter_string` selects), oldest
    first."""
    if experiment_id is None:
        return pd.DataFrame(columns=["run_id", "start_time", "status"])
    mlflow.set_tracking_uri(client.tracking_uri)  # search_runs reads through MLflow's fluent API
    runs = mlflow.search_runs([experiment_id], filter_string, output_format="pandas")
    return runs.sort_values(["start_time", "run_id"]).reset_index(drop=True) if len(runs) else runs


def measured_on(client: MlflowClient, device: str) -> pd.DataFrame:
    """The ok runs of every experiment in the store that trained on `device` (tags.peaks_device,
    the name the run's peaks came under) with a predicted and a measured step time."""
    experiments = [found.experiment_id for found in client.search_experiments()]
    if not experiments:
        return pd.DataFrame(columns=["run_id"])
    mlflow.set_tracking_uri(client.tracking_uri)
    return mlflow.search_runs(experiments, f"tags.peaks_device = '{device}' and tags.status = 'ok'"
                              " and metrics.predicted_step_s > 0 and metrics.step_time_mean_s > 0",
                              output_format="pandas")


def of_cell(runs: pd.DataFrame, fingerprint: str) -> pd.DataFrame:
    """The runs of one cell (tags.cell), newest first."""
    if "tags.cell" not in runs:
        return runs.iloc[:0]
    return runs[runs["tags.cell"] == fingerprint].iloc[::-1]


def newest(runs: pd.DataFrame, fingerprint: str) -> pd.Series | None:
    """The cell's newest run that has ended, else its newest (claimed or running), or None: a
    claim another runner makes after a run finished the cell is not what the cell is."""
    found = of_cell(runs, fingerprint)
    ended = found[~found["tags.status"].isin(LIVE)] if "tags.status" in found else found
    return ended.iloc[0] if len(ended) else found.iloc[0] if len(found) else None


def finished(runs: pd.DataFrame, fingerprint: str, limits: dict | None = None) -> pd.Series | None:
    """The cell's newest run that finished it (see FINISHED), or None. An oom finished the cell
    only on a machine with no more memory than where it ran out: `limits` are this one's
    ({"cpu": MiB, "gpu": MiB or None}, see measure.traces.limits)."""
    for _, run in of_cell(runs, fingerprint).iterrows():
        if run.get("tags.status") in FINISHED and not _more_room_now(run, limits or {}):
            return run
    return None


def finished_run(client: MlflowClient, experiment_id: str, fingerprint: str,
                 limits: dict | None = None) -> pd.Series | None:
    """finished() of one cell, read from the store (for a single run and for tests)."""
    return finished(of_experiment(client, experiment_id), fingerprint, limits)


def _more_room_now(run: pd.Series, limits: dict) -> bool:
    """Whether this machine has more of the memory the run ran out of (its oom_limit tags)."""
    kind, hit = run.get("tags.oom_limit"), run.get("tags.oom_limit_mib")
    if run.get("tags.status") != "oom" or pd.isna(kind) or limits.get(kind) is None:
        return False
    return limits[kind] > float(hit)


def histories(client: MlflowClient, run_ids: dict, names: tuple) -> dict:
    """{label: {metric: [(step, value), ...]}} for each label's run (`run_ids`: label: run id);
    labels whose run logged none of `names` are left out."""
    found = {}
    for label, run_id in run_ids.items():
        series = {name: [(m.step, m.value) for m in sorted(
            client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))]
            for name in names}
        if any(series.values()):
            found[label] = series
    return found
