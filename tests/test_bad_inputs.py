"""Hostile and broken inputs, one table: each is refused by the checks `python -m harness` and a
sweep's plan make before any model loads, with an error that names the value, what was expected
and what to do, and none leaves a run (nor a store) behind."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from harness.config import grids, validation
from harness.core.errors import ConfigError
from tests.conftest import compose_cell

ROWS = pd.DataFrame({"id": [f"d{i}" for i in range(10)],
                     "dialogue": [f"A: hello {i}\nB: hi" for i in range(10)],
                     "summary": [f"they greet {i}" for i in range(10)]})


def _csv(folder, name: str, table: pd.DataFrame = ROWS) -> str:
    table.to_csv(folder / name, index=False)
    return str(folder / name)


def _local(path) -> list[str]:
    return ["data=local", f"data.path={path}"]


def _with(column: str, row: int, value: str) -> pd.DataFrame:
    changed = ROWS.copy()
    changed.loc[row, column] = value
    return changed


def _latin1(folder) -> str:
    (folder / "latin1.csv").write_bytes("id,dialogue,summary\nd1,A: café\nB: oui,ça va\n"
                                        .encode("latin-1"))
    return str(folder / "latin1.csv")


def _folder_without(folder, split: str) -> str:
    (folder / "splits").mkdir()
    for each in ("train", "validation", "test"):
        if each != split:
            _csv(folder / "splits", f"{each}.csv")
    return str(folder / "splits")


def _unreadable_split(folder) -> str:
    (folder / "splits").mkdir()
    _csv(folder / "splits", "train.csv")
    _csv(folder / "splits", "validation.csv")
    (folder / "splits" / "test.csv").mkdir()  # a folder where the file should be
    return str(folder / "splits")


def _a_file(folder) -> str:
    (folder / "a-file").write_text("not a folder")
    return str(folder / "a-file" / "cache")


# name: (the overrides, given a scratch folder; what the error must say: the value, what was
# expected, what to do).
CASES = {
    "data file empty": (lambda f: _local(_csv(f, "empty.csv", ROWS.iloc[:0])),
                        ["empty.csv", "the file is empty", "expected rows with columns"]),
    "data file of zero bytes": (lambda f: (f / "zero.csv").write_text("") or _local(f / "zero.csv"),
                                ["zero.csv", "cannot be read as csv", "expected rows"]),
    "data file not UTF-8": (lambda f: _local(_latin1(f)),
                            ["latin1.csv", "not UTF-8", "expected UTF-8", "iconv"]),
    "data file missing a column": (lambda f: _local(_csv(f, "cut.csv", ROWS.drop(
        columns="summary"))), ["cut.csv", "missing column summary", "expected id, dialogue"]),
    "an empty dialogue": (lambda f: _local(_csv(f, "blank.csv", _with("dialogue", 3, " "))),
                          ["blank.csv", "row 4 (id d3) has an empty dialogue", "expected text",
                           "fill it or drop the row"]),
    "an empty summary": (lambda f: _local(_csv(f, "nosum.csv", _with("summary", 0, ""))),
                         ["nosum.csv", "row 1 (id d0) has an empty summary", "drop the row"]),
    "an enormous dialogue": (lambda f: _local(_csv(f, "huge.csv", _with(
        "dialogue", 5, "A: la " * 50_000))), ["huge.csv", "row 6 (id d5)", "300,000 characters",
                                              "expected at most 200,000", "shorten or drop"]),
    "a folder without a test split": (lambda f: _local(_folder_without(f, "test")),
                                      ["splits", "exactly one test file", "found none"]),
    "a path that does not exist": (lambda f: _local(f / "nowhere.csv"),
                                   ["nowhere.csv", "does not exist", "expected a csv"]),
    "a split that cannot be read": (lambda f: _local(_unreadable_split(f)),
                                    ["test.csv", "cannot be read (IsADirectoryError",
                                     "expected a readable file"]),
    "source length zero": (lambda f: ["data.source_max_length=0"],
                           ["data.source_max_length=0", "expected a positive number of tokens",
                            "p85"]),
    "target length negative": (lambda f: ["data.target_max_length=-8"],
                               ["data.target_max_length=-8", "expected a positive number"]),
    "length p0": (lambda f: ["data.source_max_length=p0"],
                  ["'p0'", "percentile of the tokenized lengths from p1 to p100"]),
    "length p101": (lambda f: ["data.source_max_length=p101"], ["'p101'", "from p1 to p100"]),
    "length not a number": (lambda f: ["data.target_max_length=long"],
                            ["'long'", "expected a positive number of tokens (e.g. 512)"]),
    "batch size zero": (lambda f: ["train.batch_size=0"],
                        ["train.batch_size=0", "expected a positive integer"]),
    "batch size negative": (lambda f: ["eval.batch_size=-4"],
                            ["eval.batch_size=-4", "expected a positive integer"]),
    "epochs zero": (lambda f: ["train.epochs=0"], ["train.epochs=0", "expected a positive"]),
    "steps negative": (lambda f: ["train.max_steps=-1"],
                       ["train.max_steps=-1", "expected null", "number of optimizer steps"]),
    "store neither sqlite nor http(s)": (
        lambda f: ["tracking.uri=ftp://store.example/mlflow"],
        ["tracking.uri='ftp://store.example/mlflow'", "expected sqlite:///<file>",
         "tracking=server"]),
    "store a database URI": (lambda f: ["tracking.uri=postgresql://u@db/mlflow"],
                             ["postgresql://u@db/mlflow", "expected sqlite:///<file>",
                              "MLflow server"]),
    "store with credentials inside": (
        lambda f: ["tracking.uri=http://admin:hunter2hunter2@10.0.0.5:5000"],
        ["http://***@10.0.0.5:5000", "credentials inside it", "MLFLOW_TRACKING_PASSWORD"]),
    "cache_dir not writable": (lambda f: [f"cache_dir={_a_file(f)}"],
                               ["a-file/cache", "not a folder this user can write in",
                                "choose another"]),
    "stale_after_s not above the heartbeat": (
        lambda f: ["runner.heartbeat_s=60", "runner.stale_after_s=90"],
        ["runner.stale_after_s=90", "twice runner.heartbeat_s=60", "raise stale_after_s"]),
}


def test_hostile_inputs_are_refused_before_any_model_loads(tmp_path, fault_figures, capsys):
    refused = {}
    for number, (name, (overrides, says)) in enumerate(CASES.items()):
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        given = overrides(folder)
        for key, value in (("tracking.uri", f"sqlite:///{folder}/mlflow.db"),
                           ("cache_dir", f"{folder}/cache")):  # the case's own, unless it sets one
            if not any(override.startswith(f"{key}=") for override in given):
                given.append(f"{key}={value}")
        cfg = compose_cell(*given)
        with pytest.raises(ConfigError) as error:
            validation.validate(cfg)
        message = str(error.value)
        missing = [words for words in says if words not in message]
        assert not missing, f"{name}: {message!r} lacks {missing}"
        assert not (folder / "mlflow.db").exists(), f"{name} left a store"
        refused[name] = message
    # An experiment file that is not YAML, as `make sweep` and `make plan` read it.
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "broken.yaml").write_text("defaults:\n  - /model: t5-tiny\n  grid: [1, 2\n")
    (experiments / "a_list.yaml").write_text("- model\n- method\n")
    original = grids.EXPERIMENTS
    grids.EXPERIMENTS = experiments
    try:
        for name, says in (("broken", ["broken.yaml is not YAML", "at line 3", "fix it"]),
                           ("a_list", ["a_list.yaml holds a list", "expected `defaults:`"])):
            with pytest.raises(ConfigError) as error:
                grids.compose_experiment(name, [])
            assert all(words in str(error.value) for words in says), str(error.value)
            refused[f"experiment {name}.yaml"] = str(error.value)
    finally:
        grids.EXPERIMENTS = original
    with capsys.disabled():
        print(f"\n[bad inputs] {len(refused)} refused before any model loads, 0 runs left")
    fault_figures.update(fault="bad inputs (a table of hostile or broken values)",
                         checked="each refused with the value, what was expected and what to "
                                 "do, before any model loads; no store or run left",
                         inputs=len(refused), refused=len(refused), runs_left=0)


def test_the_checks_load_no_model_library():
    # What refuses them runs before torch, transformers and bitsandbytes are imported.
    found = subprocess.run([sys.executable, "-c", (
        "import json, sys; from harness.config import grids, validation; "
        "print(json.dumps(sorted({'torch', 'transformers', 'bitsandbytes', 'peft'} "
        "& set(sys.modules))))")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(grids.CONF_DIR.parent)})
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == []
