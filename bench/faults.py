"""`make faults`: the fault suite, on real processes, and its figures in reports/faults.md.

Runs the fault cases of the test suite (a runner SIGKILLed, a tracking server that goes away
mid-cell and one that stays away until `make sync`, two sweeps of one experiment at once on
sqlite and on PostgreSQL, stale runs, racing claims, cells that raise, run out of memory or are
killed, a rank killed, SIGTERM to a run and to a distributed cell, a table of bad inputs). Each
test records what it checked and its figures (the `fault_figures` fixture); this writes them
with the test's outcome and the machine they came from.

    python bench/faults.py [--gpu] [--out FOLDER]

--gpu: only the cases a CUDA cell changes (runner SIGKILL: a GPU held by an orphan is the costly
case; the outage, where `mlflow server` is installed: the lent GPU machine has MLflow's client
alone), into reports/gpu-<device>/faults.md (`make gpu-check` runs it in call 1).
The PostgreSQL cases need HARNESS_TEST_POSTGRES (`eval "$(bash .ci/services.sh)"`).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULT_TESTS = [
    "tests/test_faults.py",
    "tests/test_bad_inputs.py::test_every_bad_input_is_refused_cleanly",
    "tests/test_faults.py::test_a_full_disk_mid_cell_ends_it_failed_and_loses_nothing",
    "tests/test_isolation.py::test_failures_inside_a_sweep_end_with_their_status_and_spare_the_"
    "others",
    "tests/test_isolation.py::test_a_terminated_run_ends_killed_with_its_memory_trace_and_runs_"
    "again",
    "tests/test_distributed_cells.py::test_a_rank_killed_ends_the_cell_failed_naming_it_and_no_"
    "rank_survives",
    "tests/test_distributed_cells.py::test_sigterm_stops_every_rank_and_closes_the_run_killed",
]
GPU_FAULT_TESTS = [
    "tests/test_faults.py::test_a_runner_killed_outright_leaves_no_process_and_its_run_is_closed",
    "tests/test_faults.py::test_a_tracking_server_that_goes_away_loses_nothing",
]


def run(tests: list[str]) -> tuple[list[dict], dict, float]:
    """Run the tests; (the figures they recorded, {test name: outcome}, seconds)."""
    with tempfile.TemporaryDirectory(prefix="harness-faults-") as folder:
        figures, junit = Path(folder) / "figures.jsonl", Path(folder) / "junit.xml"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *tests], cwd=REPO,
                       env={**os.environ, "HARNESS_FAULTS_OUT": str(figures)})
        seconds = time.monotonic() - started
        found = ([json.loads(line) for line in figures.read_text().splitlines()]
                 if figures.exists() else [])
        outcomes = {}
        if junit.exists():
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                failed = case.find("failure") is not None or case.find("error") is not None
                skipped = case.find("skipped") is not None
                outcomes[case.get("name")] = ("FAILED" if failed else "skipped" if skipped
                                              else "passed")
    return found, outcomes, seconds


def render(found: list[dict], outcomes: dict, seconds: float, machine: str) -> str:
    by_test = {entry["test"]: entry for entry in found}
    lines = ["# Faults: nothing lost, nobody let in", "",
             f"`make faults` on {machine}, {time.strftime('%Y-%m-%d')}: "
             f"{sum(outcome == 'passed' for outcome in outcomes.values())} of {len(outcomes)} "
             f"cases passed in {seconds / 60:.1f} min. Every figure below was measured in this "
             "run, against real processes (the runner, its cells, `mlflow server`, "
             "PostgreSQL); tests/test_faults.py says how each case is made.", "",
             "| fault | what was checked | figures | result |", "|---|---|---|---|"]
    for test, outcome in outcomes.items():
        entry = by_test.get(test, {})
        numbers = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in entry.items()
                            if key not in ("test", "fault", "checked", "cases"))
        lines.append(f"| {entry.get('fault', test)} | {entry.get('checked', '')} | "
                     f"{numbers or '—'} | {outcome} |")
    lost = sum(entry.get("lost", 0) for entry in found)
    survivors = sum(entry.get("survivors", 0) for entry in found)
    lines += ["", f"In all: {lost} results lost, {survivors} processes surviving their runner "
                  f"or cell, "
                  f"{sum(entry.get('runs_left_running', 0) for entry in found)} runs left "
                  "RUNNING.", ""]
    for entry in found:
        if "cases" in entry:
            lines += _bad_inputs(entry)
    return "\n".join(lines)


def _bad_inputs(entry: dict) -> list[str]:
    """The bad-input table: each input as `python -m harness` was given it, and its refusal."""
    lines = ["## Bad inputs", "",
             f"{entry['tried']} inputs tried, {entry['refused_cleanly']} refused cleanly (exit "
             "code 2, one line naming the key or file, under 1,000 characters, no traceback, no "
             f"run left), {entry['silently_wrong']} silently wrong (accepted and run).", "",
             "| input | exit code | the refusal (its start) |", "|---|---|---|"]
    for case in entry["cases"]:
        message = case["message"].replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| {case['input']} | {case['exit code']} | {message} |")
    return lines + [""]


def machine() -> tuple[str, str | None]:
    """(the machine in words, its GPU's name or None)."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    words = f"{cpu}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else ", no GPU")
    return words, gpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the folder of faults.md (default: reports/, and "
                                      "reports/gpu-<device>/ with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="the CUDA cases only")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="--gpu's cases on the CPU (the GPU machine's set-up rehearsed)")
    args = parser.parse_args(argv)
    words, gpu = machine()
    if args.gpu and gpu is None and not args.allow_cpu:
        print("error: --gpu needs CUDA; without it run `make faults`", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
    elif args.gpu:
        from harness.gpu_check import device_folder

        out = REPO / "reports" / device_folder(gpu or "cpu")
    else:
        out = REPO / "reports"
    found, outcomes, seconds = run(GPU_FAULT_TESTS if args.gpu else FAULT_TESTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.md").write_text(render(found, outcomes, seconds, words))
    print(f"[harness] wrote {out / 'faults.md'}")
    return 0 if outcomes and all(outcome != "FAILED" for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
