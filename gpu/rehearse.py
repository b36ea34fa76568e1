"""`make gpu-rehearsal`: the lent GPU machine's set-up, rehearsed here, offline, on the CPU.

    python gpu/rehearse.py [--wheels .whl] [--keep DIR]

1. resolve: pip's resolver, for CPython 3.12 on manylinux x86_64 and without any index, against
   the wheelhouse (`make gpu-wheels`, built first if missing) and a stand-in for each package of
   gpu/machine.txt (an empty wheel at its listed version, or at the version tested here where
   the list gives none): every requirement met, every wheel of the wheelhouse used, the pinned
   libraries at the versions this checkout tests.
2. install: the same wheelhouse built for this machine's Python; a stand-in for the machine (a
   new virtual environment holding only the packages of gpu/machine.txt: at their listed
   versions where this Python has a wheel of it, else linked from this checkout's environment;
   torch is the CPU build here); then, with that environment's
   python3 first on PATH and no index, `. gpu/env.sh` and `make gpu-check PY=python3` as the
   machine runs them: call 1's parts (the preflight, the calibration, one check row on t5-tiny
   on the CPU with allow_cpu=true, through the runner, the cell process, the sampler, the store
   and the report, and the faults) and call 3's profile, into a temporary folder.
It fails, naming what is missing, if either does.
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wheelhouse  # noqa: E402  (gpu/ is a folder of scripts, not a package)

REPO = wheelhouse.REPO
# One check row on the smallest model, a few steps: what `make gpu-check CALL=1` runs, in
# seconds on two cores.
CPU_CELL = ["allow_cpu=true", "model=t5-tiny", "train.max_steps=2", "data.train_size=32",
            "data.validation_size=4", "data.test_size=8", "eval.infer_examples=4"]


def stand_in_wheel(folder: Path, name: str, version: Version) -> None:
    """An empty wheel that declares `name` `version` and nothing else: what the machine has."""
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA",
                       f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: rehearse\n"
                                        "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")


def machine_versions(machine: dict, carried: set[str]) -> dict[str, Version]:
    """The machine's packages the wheelhouse does not shadow, at their listed versions, or at the
    version tested here (those not installed here nothing here asks for)."""
    versions = {}
    for name, listed in machine.items():
        if name in carried:
            continue
        if listed is None:
            try:
                listed = Version(importlib.metadata.version(name))
            except importlib.metadata.PackageNotFoundError:
                continue
        versions[name] = Version(listed.public)  # torch's +cu130 is a build, not a version
    return versions


def resolve(wheels: Path, machine: dict, work: Path) -> None:
    """pip's resolver for the machine's Python: wheelhouse + machine stand-ins satisfy pyproject."""
    carried = dict(line.split("==") for line in (wheels / wheelhouse.MANIFEST).read_text().split())
    stand_ins = work / "machine-wheels"
    stand_ins.mkdir()
    for name, version in machine_versions(machine, set(carried)).items():
        stand_in_wheel(stand_ins, name, version)
    platforms = [option for platform in wheelhouse.PLATFORMS
                 for option in ("--platform", platform)]
    report = work / "resolution.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-qq", "--dry-run", "--ignore-installed",
         "--no-index", "--find-links", str(wheels), "--find-links", str(stand_ins),
         "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
         *platforms, "--target", str(work / "target"), "--report", str(report),
         "-r", str(wheels / wheelhouse.REQUIREMENTS), "-c", str(wheels / wheelhouse.MANIFEST)],
        capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: pip cannot resolve the project for the GPU machine from the "
                         f"wheelhouse and gpu/machine.txt:\n{result.stderr[-3000:]}")
    resolved = {canonicalize_name(item["metadata"]["name"]):
                (item["metadata"]["version"], item["download_info"]["url"])
                for item in json.loads(report.read_text())["install"]}
    from_wheelhouse = {name for name, (_, url) in resolved.items()
                       if Path(url.removeprefix("file://")).parent == wheels.resolve()}
    unused = set(carried) - from_wheelhouse
    if unused:
        raise SystemExit(f"error: the wheelhouse carries {', '.join(sorted(unused))}, which "
                         "the resolution does not use")
    for name in wheelhouse.PINNED & set(carried):
        if resolved[name][0] != carried[name]:
            raise SystemExit(f"error: {name} resolves to {resolved[name][0]}, not the "
                             f"{carried[name]} tested here")
    print(f"[rehearsal] resolved for CPython 3.12: {len(resolved)} packages, "
          f"{len(from_wheelhouse)} from the wheelhouse, the rest the machine's")


def listed_versions(machine: dict) -> dict[str, Version]:
    """The machine's packages whose listed version is not the one tested here."""
    differing = {}
    for name, listed in machine.items():
        try:
            tested = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        if listed is not None and listed != tested:
            differing[name] = listed
    return differing


def install_listed(machine: dict, site: Path, work: Path) -> tuple[set[str], set[str]]:
    """Into `site`, each package at the machine's listed version where the index has a wheel of
    it for this Python (torch's CUDA build and numpy 2.5 for Python 3.11 it has not: those stand
    in at the version tested here), with what it needs, at the versions tested here where they
    are installed here. The names at their listed version, and every name installed."""
    available = []
    for name, listed in listed_versions(machine).items():
        found = subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps",
                                "--only-binary=:all:", "--dest", str(work / "listed"),
                                f"{name}=={listed}"], capture_output=True)
        if found.returncode == 0:
            available.append(f"{name}=={listed}")
    if not available:
        return set(), set()
    pinned = {canonicalize_name(requirement.split("==")[0]) for requirement in available}
    constraints = work / "tested-versions.txt"
    constraints.write_text("".join(
        f"{dist.metadata['Name']}=={dist.version}\n" for dist in importlib.metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) not in pinned))
    subprocess.run([sys.executable, "-m", "pip", "install", "-qq", "--only-binary=:all:",
                    "--target", str(site), "-c", str(constraints), *available], check=True)
    installed = {canonicalize_name(dist.metadata["Name"])
                 for dist in importlib.metadata.distributions(path=[str(site)])}
    unlisted = installed - set(machine)
    if unlisted:
        print(f"[rehearsal] warning: the listed versions need {', '.join(sorted(unlisted))}, "
              "which gpu/machine.txt does not list")
    return pinned, installed


def stand_in_machine(machine: dict, folder: Path) -> Path:
    """A new virtual environment with only the machine's packages: at their listed versions
    where this Python has a wheel of them, else each file linked from this environment (pip
    and setuptools too, which the machine also has). Its bin/ folder, where python3 is."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = Path(subprocess.run([str(folder / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    at_listed, installed = install_listed(machine, site, folder.parent)
    linked = 0
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in machine or name in installed or not dist.files:
            continue
        for file in dist.files:
            if file.parts[0] == "..":  # scripts in bin/: the machine's are not needed
                continue
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(dist.locate_file(file), target)
            linked += 1
    print(f"[rehearsal] machine stand-in: {folder}; at the listed version: "
          f"{', '.join(sorted(at_listed)) or 'none'}; {linked} files linked from this environment")
    return folder / "bin"


def install_and_run(machine: dict, work: Path) -> None:
    """gpu/env.sh and make gpu-check PY=python3, as on the machine, on this machine's Python."""
    twin = work / "wheels"
    wheelhouse.build(twin, f"{sys.version_info.major}.{sys.version_info.minor}", machine,
                     wheelhouse.project_requirements())
    bin_folder = stand_in_machine(machine, work / "machine")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    environment.update(PATH=f"{bin_folder}:{environment['PATH']}", WHEELS=str(twin),
                       SITE=str(work / "site"), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    out, store = work / "report", work / "store"
    command = (f". gpu/env.sh && make gpu-check PY=python3 CALL=1 ROWS=base_lora "
               "PARTS=preflight,calibrate,cells,profile,faults "
               f"OUT={out} STORE={store} ARGS='{' '.join(CPU_CELL)}'")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=environment)
    if result.returncode:
        raise SystemExit(f"error: `{command}` failed ({result.returncode}) on the stand-in")
    runs = (out / "runs.csv").read_text()
    if "t5-tiny/lora-r16/fp32" not in runs or ",ok," not in runs:
        raise SystemExit(f"error: the rehearsal's cell did not end ok:\n{runs}")
    if not list((out / "calibration").glob("calibration-*.json")):
        raise SystemExit(f"error: the calibrate part wrote nothing under {out}/calibration")
    if not (out / "profile.csv").exists():
        raise SystemExit(f"error: the profile part wrote no {out}/profile.csv")
    print(f"[rehearsal] {command}: the cell ended ok; {out}/report.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python gpu/rehearse.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    machine = wheelhouse.machine_packages()
    wheels_made = all((args.wheels / name).exists()
                      for name in (wheelhouse.MANIFEST, wheelhouse.REQUIREMENTS))
    if not wheels_made and wheelhouse.main(["--out", str(args.wheels)]):
        return 1
    with tempfile.TemporaryDirectory(prefix="gpu-rehearsal-") as temporary:
        work = args.keep or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        resolve(args.wheels.resolve(), machine, work)
        install_and_run(machine, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
