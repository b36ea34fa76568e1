"""What the lent GPU machine gets carried (gpu/wheelhouse.py), read off this environment's real
package metadata, and the command lines that run there without an install. The download, the
resolver's dry run for Python 3.12 and the install on a stand-in machine are `make
gpu-rehearsal`, which CI runs before the suite."""

import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from harness import gpu_check
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "gpu"))
import rehearse  # noqa: E402
import wheelhouse  # noqa: E402

from harness.config import grids

MACHINE = wheelhouse.machine_packages()
TARGET = wheelhouse.target_environment("3.12")


def carried(machine=MACHINE, requirements=None):
    return wheelhouse.carried_packages(requirements or wheelhouse.project_requirements(),
                                       machine, TARGET)


def test_the_machine_list_reads_names_and_the_versions_it_gives():
    assert MACHINE["torch"] == Version("2.11.0+cu130") and MACHINE["pandas"] is None
    assert MACHINE["huggingface-hub"] == Version("1.33.0")  # canonical names
    assert wheelhouse.cuda_build(MACHINE) == "130"


def test_what_the_machine_lacks_travels_at_the_version_tested_here():
    wheels = carried()
    assert wheels["hydra-core"][0] == Version(importlib.metadata.version("hydra-core"))
    assert {"omegaconf", "antlr4-python3-runtime", "rouge-score", "nltk", "datasets",
            "bitsandbytes", "sqlalchemy", "alembic"} <= set(wheels)
    # The full mlflow (server, UI) stays behind: its client does what the cells need.
    assert "mlflow-skinny" in wheels and "mlflow" not in wheels and "flask" not in wheels
    # What the machine has is not carried, nor followed: torch's own needs are the machine's.
    assert not {"torch", "numpy", "pandas", "psutil", "nvidia-ml-py", "pyarrow"} & set(wheels)
    assert not {"sympy", "networkx"} & set(wheels)


def test_the_libraries_that_decide_a_measurement_travel_where_the_machines_differ():
    wheels = carried()
    assert wheels["transformers"][1] == "pinned: the machine has 5.17.0"
    assert wheels["peft"][1] == "pinned: the machine has a version not listed"
    # accelerate travels only where the registry gave this checkout another version than the
    # machine's (1.15.0); a new release there must not leave the machine on an untested one.
    if Version(importlib.metadata.version("accelerate")) == MACHINE["accelerate"]:
        assert "accelerate" not in wheels
    else:
        assert wheels["accelerate"] == (Version(importlib.metadata.version("accelerate")),
                                        f"pinned: the machine has {MACHINE['accelerate']}")


def test_a_machine_version_that_fails_a_requirement_is_carried():
    machine = {**MACHINE, "huggingface-hub": Version("0.20.0")}
    why = carried(machine)["huggingface-hub"][1]
    assert why.startswith("the machine's 0.20.0 does not satisfy huggingface-hub")
    # A requirement whose marker is for another platform carries nothing.
    assert carried(requirements=[Requirement('pywin32>=300; sys_platform == "win32"')]) == {}


def test_a_package_not_installed_here_is_refused_with_what_to_do():
    with pytest.raises(SystemExit, match="not-a-package is not installed.*make install"):
        carried(requirements=[Requirement("not-a-package")])


def test_a_machine_stand_in_wheel_declares_only_its_name_and_version(tmp_path):
    rehearse.stand_in_wheel(tmp_path, "hf-xet", Version("1.2.0"))
    [wheel] = tmp_path.glob("*.whl")
    assert wheel.name == "hf_xet-1.2.0-py3-none-any.whl"
    metadata = zipfile.ZipFile(wheel).read("hf_xet-1.2.0.dist-info/METADATA").decode()
    assert "Name: hf-xet\nVersion: 1.2.0\n" in metadata and "Requires-Dist" not in metadata


def test_the_three_device_calls_cover_every_check_row_once():
    rows = [row for _, picked in gpu_check.CALLS.values() for row in picked.split(",")]
    options = {path.stem for path in (grids.EXPERIMENTS / "check_row").glob("*.yaml")}
    assert sorted(rows) == sorted(options)
    assert all(parts.startswith("preflight") for parts, _ in gpu_check.CALLS.values())


def make_dry_run(*arguments: str) -> str:
    """What `make -n ARGUMENTS` would run, as a user's shell would (not a sub-make of `make
    test`, which prints the folders it enters)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(["make", "-n", "--no-print-directory", *arguments], cwd=REPO,
                          env=environment, capture_output=True, text=True, check=True).stdout


def test_on_the_machine_make_runs_the_given_python_without_installing():
    dry = make_dry_run("gpu-check", "PY=python3", "CALL=2", "ARGS=a=1")
    assert "pip install" not in dry and "venv" not in dry
    assert "python3 -m harness.gpu_check --call 2" in dry and dry.rstrip().endswith("a=1")
    assert ".venv/bin/python -m harness.gpu_check" in make_dry_run("gpu-check")
