"""Hostile, broken and mistyped inputs, one table, each given to `python -m harness` as a user
types it: every one is refused with exit code 2, one line that names the key or the file (its
value, what was expected, what to do), under 1,000 characters, no traceback, and no run left in
the store. Most run the command's own entry point in this process (a refusal loads no model);
those refused by the runner, and those about the process itself (credentials on disk, the time a
refusal takes, a sweep), run it as a process.
"""

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from harness.config import grids
from harness.core.errors import ConfigError
from tests.conftest import REPO, free_port, runs_of

ROWS = pd.DataFrame({"id": [f"d{i}" for i in range(12)],
                     "dialogue": [f"A: hello {i}\nB: hi" for i in range(12)],
                     "summary": [f"they greet {i}" for i in range(12)]})


def _csv(folder, name: str, table: pd.DataFrame = ROWS) -> str:
    table.to_csv(folder / name, index=False)
    return str(folder / name)


def _local(path, *more: str) -> list[str]:
    return ["data=local", f"data.path={path}", *more]


def _with(column: str, row: int, value: str) -> pd.DataFrame:
    changed = ROWS.copy()
    changed.loc[row, column] = value
    return changed


def _write(folder, name: str, text: str | bytes) -> str:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


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


def _pipe(folder) -> str:
    os.mkfifo(folder / "pipe.csv")  # reading it would wait for ever
    return str(folder / "pipe.csv")


def _a_file(folder) -> str:
    """A path under a file: no folder can be made there, whoever the user is (root too)."""
    (folder / "a-file").write_text("not a folder")
    return str(folder / "a-file")


LONG_LIST = "[" + ",".join(f"module_{i}" for i in range(7000)) + "]"  # ~70 KB

# name: (the arguments, given the case's scratch folder; what the one-line refusal must say).
CASES = {
    # What used to be accepted and train something else (silently wrong).
    "negative clipping norm": (lambda f: ["train.max_grad_norm=-1"],
                               ["train.max_grad_norm=-1.0", "> 0, or null"]),
    "clipping norm zero": (lambda f: ["train.max_grad_norm=0"], ["train.max_grad_norm=0"]),
    "fractional steps": (lambda f: ["train.max_steps=3.5"],
                         ["train.max_steps=3.5", "expected an integer >= 0"]),
    "misplaced +lr": (lambda f: ["+lr=3e-4"], ["has no key lr", "did you mean method.lr or "
                                                                "train.lr?"]),
    "misplaced +optimizer": (lambda f: ["+optimizer=sgd"], ["did you mean method.optimizer?"]),
    "a rank for full fine-tuning": (lambda f: ["method=full", "+method.r=16"],
                                    ["method.r", "method=full has no key r",
                                     "a key of the method kind lora, lora_lomo"]),
    "negative warm-up": (lambda f: ["train.warmup_steps=-5"], ["train.warmup_steps=-5"]),
    "infinite rate": (lambda f: ["train.lr=inf"], ["train.lr=inf", "a finite number > 0"]),
    "not-a-number rate": (lambda f: ["train.lr=nan"], ["train.lr=nan", "a finite number"]),
    "a row with more fields than the header": (
        lambda f: _local(_write(f, "shifted.csv", "id,dialogue,summary\nd1,A: hi,greet,EXTRA\n")),
        ["shifted.csv", "more fields than the header"]),
    "a column nothing reads": (lambda f: _local(_csv(f, "notes.csv", ROWS.assign(notes="n"))),
                               ["notes.csv", "column notes is read by nothing", "data.columns"]),
    "experiment name with a newline": (lambda f: ["tracking.experiment='a\nb'"],
                                       ["tracking.experiment=a\\nb"]),
    # What used to end in a traceback.
    "steps not a number": (lambda f: ["train.max_steps=abc"], ["train.max_steps=abc"]),
    "seed not a number": (lambda f: ["train.seed=abc"], ["train.seed=abc", "an integer >= 0"]),
    "weight decay not a number": (lambda f: ["train.weight_decay=abc"],
                                  ["train.weight_decay=abc"]),
    "weight decay negative": (lambda f: ["train.weight_decay=-0.1"],
                              ["train.weight_decay=-0.1"]),
    "log every 0 steps": (lambda f: ["train.log_every_steps=0"],
                          ["train.log_every_steps=0", ">= 1"]),
    "fewer than 10 rows": (lambda f: _local(_csv(f, "few.csv", ROWS.iloc[:5])),
                           ["few.csv has 5 rows", "at least 10"]),
    "empty experiment name": (lambda f: ["tracking.experiment="], ["tracking.experiment="]),
    "null experiment name": (lambda f: ["tracking.experiment=null"],
                             ["tracking.experiment=null"]),
    "600-character experiment name": (lambda f: [f"tracking.experiment={'x' * 600}"],
                                      ["tracking.experiment=", "600 characters"]),
    "store is a folder": (lambda f: [f"tracking.uri=sqlite:///{f}"],
                          ["names a folder", "mlflow.db"]),
    "store under a file": (lambda f: [f"tracking.uri=sqlite:///{_a_file(f)}/mlflow.db"],
                           ["a-file", "not a folder this user can write in"]),
    "store not a database": (lambda f: [f"tracking.uri=sqlite:///{_write(f, 'x.db', 'hello')}"],
                             ["x.db is not an SQLite database"]),
    "journal under a file": (lambda f: [f"tracking.journal_dir={_a_file(f)}/journal"],
                             ["tracking.journal_dir=", "not a folder this user can write in"]),
    "artifacts under a file": (lambda f: [f"tracking.artifact_location={_a_file(f)}/art"],
                               ["tracking.artifact_location=", "not a folder this user can"]),
    "cache under a file": (lambda f: [f"cache_dir={_a_file(f)}/cache"],
                           ["cache_dir=", "not a folder this user can write in"]),
    # Other.
    "a 70 KB list": (lambda f: [f"method.target_modules={LONG_LIST}"],
                     ["method.target_modules=", "characters)"]),
    "a named pipe as the data": (lambda f: _local(_pipe(f)), ["pipe.csv is a named pipe"]),
    "experiment name with ..": (lambda f: ["tracking.experiment=../escape"],
                                ["tracking.experiment=../escape"]),
    "experiment name as an absolute path": (lambda f: ["tracking.experiment=/tmp/x"],
                                            ["tracking.experiment=/tmp/x"]),
    # Ranges and types.
    "batch size zero": (lambda f: ["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
    "batch size as a float": (lambda f: ["train.batch_size=8.0"], ["train.batch_size=8.0"]),
    "eval batch negative": (lambda f: ["eval.batch_size=-4"], ["eval.batch_size=-4"]),
    "epochs zero": (lambda f: ["train.epochs=0"], ["train.epochs=0"]),
    "fractional epochs": (lambda f: ["train.epochs=1.5"], ["train.epochs=1.5"]),
    "steps negative": (lambda f: ["train.max_steps=-1"], ["train.max_steps=-1"]),
    "no accumulation steps": (lambda f: ["train.grad_accum_steps=0"],
                              ["train.grad_accum_steps=0"]),
    "rate zero": (lambda f: ["train.lr=0"], ["train.lr=0"]),
    "checkpointing neither on nor off": (lambda f: ["train.gradient_checkpointing=sometimes"],
                                         ["train.gradient_checkpointing=sometimes",
                                          "true or false"]),
    "beams zero": (lambda f: ["eval.num_beams=0"], ["eval.num_beams=0"]),
    "inference sometimes": (lambda f: ["eval.infer=sometimes"],
                            ["eval.infer=sometimes", "true, false or auto"]),
    "eval loss batches zero": (lambda f: ["eval.loss_max_batches=0"],
                               ["eval.loss_max_batches=0", "auto, null or a positive"]),
    "rank zero": (lambda f: ["method.r=0"], ["method.r=0", ">= 1"]),
    "fractional rank": (lambda f: ["method.r=2.5"], ["method.r=2.5"]),
    "alpha negative": (lambda f: ["method.alpha=-1"], ["method.alpha=-1"]),
    "dropout 1.5": (lambda f: ["method.dropout=1.5"], ["method.dropout=1.5", "< 1"]),
    "an optimizer not offered": (lambda f: ["method.optimizer=lion"],
                                 ["method.optimizer=lion", "one of adamw, sgd"]),
    "LOMO's base rate zero": (lambda f: ["method=lora_lomo", "method.lr_base=0"],
                              ["method.lr_base=0"]),
    "master weights perhaps": (lambda f: ["precision=bf16", "precision.master_weights=perhaps"],
                               ["precision.master_weights=perhaps", "true or false"]),
    "a 4-bit type not offered": (lambda f: ["precision=nf4", "precision.quant_type=nf8"],
                                 ["precision.quant_type=nf8", "one of nf4, fp4"]),
    "an attention not offered": (lambda f: ["model.attn_implementation=flash"],
                                 ["model.attn_implementation=flash", "one of sdpa, eager"]),
    "a tokenizer not offered": (lambda f: ["model.tokenizer=words"], ["model.tokenizer=words"]),
    "a model folder that does not exist": (lambda f: ["model.source=/no/such/folder"],
                                           ["model.source=/no/such/folder", "existing folder"]),
    "padding on the left": (lambda f: ["data.padding=left"], ["data.padding=left"]),
    "source length zero": (lambda f: ["data.source_max_length=0"],
                           ["data.source_max_length=0", "p85"]),
    "target length negative": (lambda f: ["data.target_max_length=-8"],
                               ["data.target_max_length=-8"]),
    "length p0": (lambda f: ["data.source_max_length=p0"], ["p0", "from p1 to p100"]),
    "length p101": (lambda f: ["data.source_max_length=p101"], ["p101"]),
    "length not a number": (lambda f: ["data.target_max_length=long"], ["long", "512"]),
    "ZeRO stage 1": (lambda f: ["strategy=zero2", "strategy.stage=1"],
                     ["strategy.stage=1", "one of 2, 3"]),
    "no ranks": (lambda f: ["strategy=fsdp", "strategy.nproc_per_node=0"],
                 ["strategy.nproc_per_node=0"]),
    "no time for collectives": (lambda f: ["strategy=ddp", "strategy.timeout_s=0"],
                                ["strategy.timeout_s=0"]),
    "a start method not offered": (lambda f: ["runner.start_method=fork"],
                                   ["runner.start_method=fork"]),
    "a memory cap of zero": (lambda f: ["runner.cpu_memory_limit_mib=0"],
                             ["runner.cpu_memory_limit_mib=0"]),
    "sampling every 0 ms": (lambda f: ["sampler.interval_ms=0"], ["sampler.interval_ms=0"]),
    "a negative price": (lambda f: ["cost.usd_per_hour=-1"], ["cost.usd_per_hour=-1"]),
    # Keys and options that do not exist.
    "a misspelt method key": (lambda f: ["+method.rank=4"], ["method.rank", "has no key rank"]),
    "a misspelt data key": (lambda f: ["+data.paddin=max_length"],
                            ["did you mean data.padding?"]),
    "a strategy key of another kind": (lambda f: ["+strategy.offload_params=true"],
                                       ["did you mean strategy.offload_param (a key of the "
                                        "strategy kind zero)?"]),
    "a model that does not exist": (lambda f: ["model=flan-t5-xxxl"],
                                    ["model=flan-t5-xxxl", "no such option", "flan-t5-base"]),
    "a method that does not exist": (lambda f: ["method=qlora"], ["method=qlora", "lora_lomo"]),
    # Rules between keys.
    "LOMO with AdamW": (lambda f: ["method=lomo", "method.optimizer=adamw"],
                        ["LOMO updates every weight by SGD"]),
    "no LoRA targets": (lambda f: ["method.target_modules=[]"],
                        ["method.target_modules is empty"]),
    "int8 full fine-tuning": (lambda f: ["precision=int8", "method=full"],
                              ["method=full updates the base weights", "precision=int8"]),
    "LOMO with accumulation": (lambda f: ["method=lomo", "train.grad_accum_steps=2"],
                               ["train.grad_accum_steps=2"]),
    "3 ranks for a batch of 8": (lambda f: ["strategy=ddp", "strategy.nproc_per_node=3"],
                                 ["3 ranks", "train.batch_size=8"]),
    "a LoRA target the model lacks": (lambda f: ["method.target_modules=[q,zz]"],
                                      ["method.target_modules=['q', 'zz']", "does not have"]),
    "ranks for a single process": (lambda f: ["strategy.nproc_per_node=2"],
                                   ["strategy=single runs one process"]),
    "a node rank beyond the nodes": (lambda f: ["strategy=zero3", "strategy.nnodes=2",
                                                "strategy.node_rank=2"],
                                     ["strategy.node_rank=2", "expected 0 to 1"]),
    "offloaded weights at stage 2": (lambda f: ["strategy=zero2", "strategy.offload_param=true"],
                                     ["strategy.offload_param=true needs strategy.stage=3"]),
    "an instance without a price": (lambda f: ["cost.instance=aws-g9"],
                                    ["cost.instance='aws-g9'"]),
    "stale before two heartbeats": (lambda f: ["runner.heartbeat_s=60",
                                               "runner.stale_after_s=90"],
                                     ["runner.stale_after_s=90", "raise stale_after_s"]),
    "a store neither sqlite nor http(s)": (lambda f: ["tracking.uri=ftp://store.example/m"],
                                           ["ftp://store.example/m", "sqlite:///<file>"]),
    "a database URI as the store": (lambda f: ["tracking.uri=postgresql://u@db/mlflow"],
                                    ["tracking.uri=postgresql://***@db/mlflow"]),
    # Data files.
    "local data without a path": (lambda f: ["data=local"], ["data=local needs data.path"]),
    "a data path that does not exist": (lambda f: _local(f / "nowhere.csv"),
                                        ["nowhere.csv does not exist"]),
    "an empty data file": (lambda f: _local(_csv(f, "empty.csv", ROWS.iloc[:0])),
                           ["empty.csv", "the file is empty"]),
    "a data file of zero bytes": (lambda f: _local(_write(f, "zero.csv", "")),
                                  ["zero.csv", "cannot be read as csv"]),
    "a data file not UTF-8": (lambda f: _local(_write(f, "latin1.csv", "id,dialogue,summary\n"
                                                      "d1,A: café,ça va\n".encode("latin-1"))),
                              ["latin1.csv", "not UTF-8", "iconv"]),
    "a data file missing a column": (lambda f: _local(_csv(f, "cut.csv",
                                                           ROWS.drop(columns="summary"))),
                                     ["cut.csv", "missing column summary"]),
    "an empty dialogue": (lambda f: _local(_csv(f, "blank.csv", _with("dialogue", 3, " "))),
                          ["blank.csv", "row 4 (id d3) has an empty dialogue"]),
    "an enormous dialogue": (lambda f: _local(_csv(f, "huge.csv", _with(
        "dialogue", 5, "A: la " * 50_000))), ["huge.csv", "row 6 (id d5)", "300,000 characters"]),
    "a folder without a test split": (lambda f: _local(_folder_without(f, "test")),
                                      ["splits", "exactly one test file"]),
    "a split that cannot be read": (lambda f: _local(_unreadable_split(f)),
                                    ["test.csv", "is a folder"]),
    "a data file of another type": (lambda f: _local(_write(f, "data.txt", "hello")),
                                    ["data.txt", "unsupported file type '.txt'"]),
    "a column mapping for a column nothing reads": (
        lambda f: _local(_csv(f, "ok.csv"), "data.columns={speaker:text}"),
        ["data.columns names speaker"]),
    "classification from a local file": (lambda f: _local(_csv(f, "ok.csv"),
                                                          "data.format=classification"),
                                         ["data.format=classification with data=local"]),
}


def _cli(arguments: list[str], folder, monkeypatch, capfd) -> tuple[int, str]:
    """`python -m harness ARGUMENTS` through its own entry point, in this process: (its exit
    code, what it wrote on stderr)."""
    from harness.__main__ import cli

    monkeypatch.setattr(sys, "argv", ["harness", *arguments, f"hydra.run.dir={folder}/run"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # cli sets it; the test restores it
    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as ended:
            cli()
    finally:
        GlobalHydra.instance().clear()
    return ended.value.code, capfd.readouterr().err


def _store_arguments(folder, given: list[str]) -> list[str]:
    """The case's own store, journal and cache, unless it sets one."""
    defaults = {"tracking.uri": f"sqlite:///{folder}/mlflow.db",
                "tracking.journal_dir": f"{folder}/journal", "cache_dir": f"{folder}/cache"}
    return [*given, *(f"{key}={value}" for key, value in defaults.items()
                      if not any(argument.startswith(f"{key}=") for argument in given))]


def _judge(name: str, code, stderr: str, says: list[str]) -> dict:
    """How a case was refused: cleanly (exit 2, one error line naming the input, under 1,000
    characters, no traceback), or not."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    message = lines[0][len("error: "):] if lines else ""
    return {"input": name, "exit code": code, "message": message[:160],
            "clean": (code == 2 and len(lines) == 1 and "Traceback" not in stderr
                      and len(message) < 1000 and all(words in message for words in says)),
            "accepted": code == 0, "missing": [words for words in says if words not in message]}


def _refuse(names: list[str], tmp_path, monkeypatch, capfd) -> list[dict]:
    """Each case given to the command; how each was refused (AssertionError where one was
    not refused cleanly, or left a run)."""
    judged = []
    for number, name in enumerate(names):
        arguments, says = CASES[name]
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        code, stderr = _cli(_store_arguments(folder, arguments(folder)), folder, monkeypatch,
                            capfd)
        judged.append(_judge(name, code, stderr, says))
        assert not (folder / "mlflow.db").exists() or runs_of(
            {"uri": f"sqlite:///{folder}/mlflow.db"}, "default") == [], f"{name} left a run"
    unclean = [case for case in judged if not case["clean"]]
    assert not unclean, json.dumps(unclean, indent=1)[:4000]
    return judged


# One of each kind, for the fast suite; the whole table runs in `make test` (each case costs
# Hydra two compositions: 40 s in all here).
OF_EACH_KIND = ["negative clipping norm", "fractional steps", "misplaced +lr",
                "a rank for full fine-tuning", "infinite rate", "a column nothing reads",
                "experiment name with a newline", "store is a folder", "journal under a file",
                "a 70 KB list", "a named pipe as the data", "a model that does not exist",
                "int8 full fine-tuning", "fewer than 10 rows", "master weights perhaps"]


def test_bad_inputs_of_each_kind_are_refused_cleanly(tmp_path, monkeypatch, capfd):
    assert set(OF_EACH_KIND) <= set(CASES)
    _refuse(OF_EACH_KIND, tmp_path, monkeypatch, capfd)


@pytest.mark.slow
def test_every_bad_input_is_refused_cleanly(tmp_path, monkeypatch, capfd, fault_figures):
    judged = _refuse(list(CASES), tmp_path, monkeypatch, capfd)
    assert len(judged) >= 60
    with capfd.disabled():
        print(f"\n[bad inputs] {len(judged)} tried, {len(judged)} refused cleanly, "
              "0 silently wrong")
    fault_figures.update(fault="bad inputs (a table of hostile, broken or mistyped values)",
                         checked="each refused by `python -m harness` with exit code 2 and one "
                                 "line naming it, under 1,000 characters, no traceback, no run "
                                 "left",
                         tried=len(judged), refused_cleanly=len(judged), silently_wrong=0,
                         runs_left=0, cases=[{key: case[key] for key in
                                              ("input", "exit code", "message")}
                                             for case in judged])


def test_debug_shows_the_traceback_of_a_refusal(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HARNESS_DEBUG", "0")  # --debug sets it; the test's end restores it
    code, stderr = _cli(["--debug", *_store_arguments(tmp_path, ["train.lr=-1"])], tmp_path,
                        monkeypatch, capfd)
    assert code == 2 and "Traceback" in stderr and "error: train.lr=-1.0" in stderr


def _harness(cwd, *arguments: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess,
                                                                  float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness", *arguments], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)
    return done, time.monotonic() - started


@pytest.mark.slow
def test_refusals_by_the_runner_and_of_the_process(tmp_path):
    """Each as its own process: credentials never reach the disk, a store or artifact folder
    refused before any run exists, in seconds."""
    secret = "hunter2hunter2"
    done, seconds = _harness(tmp_path, f"tracking.uri=http://admin:{secret}@10.0.0.5:5000")
    assert done.returncode == 2 and "http://***@10.0.0.5:5000" in done.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert not any(secret in path.read_text(errors="replace") for path in written)
    assert secret not in done.stderr + done.stdout

    # A refusal before torch loads takes under 3 s (Python and Hydra start included).
    done, seconds = _harness(tmp_path, "precision=int8", "method=full",
                             f"tracking.uri=sqlite:///{tmp_path}/m.db")
    assert done.returncode == 2 and seconds < 3 * 2, (seconds, done.stderr)  # 2x: a busy CI

    # ./mlruns, where a new experiment keeps its artifacts, cannot be a folder here.
    (tmp_path / "mlruns").write_text("a file")
    done, _ = _harness(tmp_path, f"tracking.uri=sqlite:///{tmp_path}/m.db", "train.max_steps=1",
                       f"cache_dir={tmp_path}/cache", f"tracking.journal_dir={tmp_path}/j")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "keeps its artifacts in" in done.stderr and "Traceback" not in done.stderr
    assert runs_of({"uri": f"sqlite:///{tmp_path}/m.db"}, "default") == []

    # A server that does not answer: refused within seconds, not after MLflow's retries.
    done, seconds = _harness(tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "does not answer" in done.stderr and seconds < 60


@pytest.mark.slow
def test_a_sweep_with_invalid_grid_points_refuses_them_all_before_any_cell(tmp_path):
    done, _ = _harness(tmp_path, "-m", "method=lora,full", "++method.r=4,0",
                       "train.lr=-1,1e-3", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                       f"cache_dir={tmp_path}/cache")
    assert done.returncode == 2, done.stderr[-2000:]
    error = done.stderr[done.stderr.index("error: "):]
    # lr=-1 refuses 4 points, r=0 the LoRA ones (full fine-tuning drops the rank): 5 of 8.
    assert error.startswith("error: 5 of 8 grid points are refused, and so the sweep:\n")
    assert "- grid points 1, 5, 7 (method=lora ++method.r=4 train.lr=-1, ...): train.lr=-1.0" \
        in error
    assert "- grid points 3-4 (method=lora ++method.r=0 train.lr=-1, ...): method.r=0" in error
    assert "cell 1" not in done.stdout and not (tmp_path / "m.db").exists()


def test_make_plan_of_an_unknown_experiment_is_refused_at_once(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness.plan", "no_such"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no experiment 'no_such'" in done.stderr
    assert time.monotonic() - started < 3 * 2
    for name in ("../conf/config", "/etc/passwd"):
        with pytest.raises(ConfigError, match="no experiment"):
            grids.compose_experiment(name, [])


def test_the_checks_load_no_model_library():
    # What refuses them runs before torch, transformers and bitsandbytes are imported.
    found = subprocess.run([sys.executable, "-c", (
        "import json, sys; from harness.config import grids, validation; "
        "print(json.dumps(sorted({'torch', 'transformers', 'bitsandbytes', 'peft'} "
        "& set(sys.modules))))")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == []
