"""The package's layout is a checked contract: one folder per concern, each importing only the
folders below it (pyproject's import-linter `layers` contract), and no import cycle anywhere,
function-level imports included."""

import subprocess
import sys
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
