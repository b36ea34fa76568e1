"""What a cell tells its runner: each typed message of harness/cell/to_runner.py, sent over a
real pipe, recorded by the runner's CellRecord into a real MLflow run through its journal; and
the status vocabulary of harness/core/outcome.py as the exit codes and their page say it."""

import multiprocessing
import os
import re
import socket

import pytest
from mlflow import MlflowClient

from harness.cell.to_runner import Ranks, ToRunner
from harness.core.errors import EXIT_CODES, exit_code
from harness.core.outcome import FINISHED, STATUSES, Outcome
from harness.run.record import CellRecord
from harness.tracking.journal import Journal
from tests.conftest import REPO


def test_every_message_a_cell_sends_reaches_its_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("messages")
    run_id = client.create_run(experiment).info.run_id
    journal = Journal(tmp_path / "journal", client, run_id, experiment).start()
    record = CellRecord(journal)
    receive, send = multiprocessing.Pipe(duplex=False)
    cell = ToRunner(send, tmp_path)
    with cell.phase("train"):
        cell({"train_loss": 1.5}, step=3)
    cell.tag("rouge", "not computed: no text")
    cell.params({"data.source_max_length_resolved": 255})
    cell.datasets({"train": 10, "test": 2})
    (tmp_path / "predictions.csv").write_text("prediction\nhello\n")
    cell.artifact(tmp_path / "predictions.csv")
    cell.send(Ranks([(socket.gethostname(), os.getpid()), ("elsewhere", 7)]))
    send.send(Outcome("ok"))
    while receive.poll(1):
        record(receive.recv())
    assert journal.close(wait_s=60) == 0
    stored = client.get_run(run_id)
    [loss] = client.get_metric_history(run_id, "train_loss")
    assert (loss.value, loss.step) == (1.5, 3)
    assert stored.data.tags["rouge"] == "not computed: no text"
    assert stored.data.tags["phase"] == "train"
    assert stored.data.tags["rank_pids"] == f"{os.getpid()},elsewhere:7"
    assert stored.data.params["data.source_max_length_resolved"] == "255"
    assert [artifact.path for artifact in client.list_artifacts(run_id)] == ["predictions.csv"]
    assert record.reported == Outcome("ok") and record.datasets == {"train": 10, "test": 2}
    assert [name for name, _ in record.phases] == ["train"] and record.ranks == [os.getpid(),
                                                                                None]
    with pytest.raises(TypeError, match="not a message"):
        record(("metrics", {"train_loss": 1.0}, 0, 0))  # untyped: refused, not guessed at


def test_each_status_is_said_once_and_the_exit_codes_page_says_the_same():
    assert set(FINISHED) == {"ok", "skipped", "oom", "diverged"}  # failed and killed run again
    assert {status: meaning.run_status for status, meaning in STATUSES.items()} == {
        "ok": "FINISHED", "skipped": "FINISHED", "failed": "FAILED", "oom": "FAILED",
        "diverged": "FAILED", "killed": "KILLED"}
    page = (REPO / "docs" / "exit-codes.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|", page, re.MULTILINE))
    assert sorted(map(int, rows)) == sorted(set(EXIT_CODES.values()))
    for status in ("failed", "oom", "diverged"):
        assert exit_code(["ok", status]) == STATUSES[status].exit_code
    assert exit_code(["ok", "skipped", "duplicate"]) == 0
    assert exit_code(["diverged", "oom", "failed"]) == EXIT_CODES["failed"]  # the most severe
