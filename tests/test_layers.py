"""The package's layout is a checked contract: one folder per concern, each importing only the
folders below it (pyproject's import-linter `layers` contract), and no import cycle anywhere,
function-level imports included."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

from tests.conftest import REPO

HARNESS = REPO / "harness"


def test_every_folder_imports_only_the_folders_below_it():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_no_module_takes_part_in_an_import_cycle():
    graph = grimp.build_graph("harness", cache_dir=None)
    edges = [(importer, imported) for importer in sorted(graph.modules)
             for imported in sorted(graph.find_modules_directly_imported_by(importer))
             # a package and its own modules (`from harness.cell import evaluate` also
             # imports harness.cell) form no cycle
             if not imported.startswith(f"{importer}.") and not importer.startswith(f"{imported}.")]
    cycles = [(importer, imported) for importer, imported in edges
              if graph.chain_exists(importer=imported, imported=importer, as_packages=False)]
    assert cycles == []


def test_the_folders_packages_hold_no_code_of_their_own():
    # Re-exports would import a layer's heavy modules with its name (validation must run before
    # torch loads); the root's one import installs the warning filters first.
    for init in HARNESS.glob("*/__init__.py"):
        assert init.read_text() == "", init
    assert (HARNESS / "__init__.py").read_text().startswith("from harness import quiet")


def test_ci_runs_the_lowest_python_the_project_declares():
    # pyproject's requires-python is what the code needs (datetime.UTC: 3.11); CI tests that
    # version, so that code needing a later one fails there.
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    lowest = tuple(int(part) for part in declared.removeprefix(">=").split("."))
    assert sys.version_info[:2] >= lowest
    if os.environ.get("CI"):
        assert sys.version_info[:2] == lowest, f"CI runs {sys.version}; declared: {declared}"


def test_every_module_is_short_enough_to_read_alone():
    # One module per concept, each readable top to bottom (docs/layout.md): at most 330 lines.
    longer = {str(path.relative_to(REPO)): lines for path in sorted(
        [*HARNESS.rglob("*.py"), *(REPO / "bench").glob("*.py"), *(REPO / "gpu").glob("*.py")])
        if (lines := len(path.read_text().splitlines())) > 330}
    assert longer == {}
