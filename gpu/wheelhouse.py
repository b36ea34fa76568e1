"""`make gpu-wheels`: the wheels the lent GPU machine needs on top of what it already has.

    python gpu/wheelhouse.py [--out .whl] [--python-version 3.12] [--limit-mib 48]

The machine (gpu/machine.txt) has no network, so everything the harness imports that it lacks
travels with the working tree, in `.whl/` (ignored by git), and is installed there with
`pip install --no-index --no-deps --target` (gpu/env.sh). What is carried is read off this
checkout's own environment (the one `make install` built, which is what CI tests): starting from
pyproject's dependencies, a package is carried, at the version installed here, when the machine
lacks it, when its version there does not satisfy what asks for it, or, for the libraries that
decide what a cell allocates (PINNED), when its version there differs from this one. A package
the machine has is not followed further: its own needs are the machine's.

Wheels are for CPython 3.12 on manylinux x86_64; a project that publishes only a source
distribution (rouge-score, antlr4) is built into a wheel here (pure Python; anything else is
refused). bitsandbytes keeps only the native library of the machine's CUDA build (torch's local
label, cu130) and the CPU one: its other CUDA builds are 85 % of the wheel. The folder's total is
printed, and the build fails over the limit (the tree and the wheels travel in 64 MiB a call).
`.whl/carried.txt` lists name==version of every wheel and `.whl/requirements.txt` pyproject's
dependencies as the machine gets them: gpu/env.sh and gpu/rehearse.py resolve them.
"""

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MACHINE = Path(__file__).with_name("machine.txt")
MANIFEST = "carried.txt"          # name==version of every wheel
REQUIREMENTS = "requirements.txt"  # pyproject's dependencies as the machine gets them
# The libraries whose version changes what a cell allocates, computes or saves: the version CI
# tests travels whenever the machine's is another or is not known. torch cannot travel (its CUDA
# build is GBs): the machine's own runs, and the report records which.
PINNED = {"transformers", "peft", "accelerate", "bitsandbytes"}
# mlflow's full package adds its server, UI and model-serving stack; the cells, the sweep and the
# report use the client (mlflow-skinny) and an sqlite store, which needs SQLAlchemy and alembic.
SUBSTITUTES = {"mlflow": ["mlflow-skinny", "sqlalchemy", "alembic"]}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
LIMIT_MIB = 48
MIB = 2**20


def machine_packages(path: Path = MACHINE) -> dict[str, Version | None]:
    """The machine's packages: canonical name -> version, None where the list gives none."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """pyproject's runtime dependencies, with the substitutes the machine gets instead."""
    requirements = []
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        names = SUBSTITUTES.get(canonicalize_name(requirement.name))
        requirements += [Requirement(name) for name in names] if names else [requirement]
    return requirements


def target_environment(python_version: str) -> dict[str, str]:
    """Marker values of the machine: Linux x86_64, CPython `python_version`."""
    environment = default_environment()
    environment.update(python_version=python_version, python_full_version=f"{python_version}.0",
                       sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                       os_name="posix", implementation_name="cpython",
                       platform_python_implementation="CPython")
    return environment


def tested_version(name: str) -> Version:
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"error: {name} is not installed in {sys.prefix}; the wheelhouse takes "
                         "the versions this checkout tests from its environment: run `make "
                         "install` first (make gpu-wheels does)") from None


def why_carried(requirement: Requirement, machine: dict, tested: Version) -> str | None:
    """Why the machine needs `requirement`'s package from the wheelhouse; None if it does not."""
    name = canonicalize_name(requirement.name)
    if name not in machine:
        return "not on the machine"
    there = machine[name]
    if name in PINNED and there != tested:
        return f"pinned: the machine has {there or 'a version not listed'}"
    if there is not None and not requirement.specifier.contains(there, prereleases=True):
        return f"the machine's {there} does not satisfy {requirement}"
    return None


def carried_packages(requirements: list[Requirement], machine: dict,
                     environment: dict) -> dict[str, tuple[Version, str]]:
    """name -> (version tested here, why) for every package the wheelhouse must carry. Every
    edge into a machine package is checked, so a second, stricter requirement carries it."""
    carried: dict[str, tuple[Version, str]] = {}
    pending = [(requirement, "") for requirement in requirements]
    while pending:
        requirement, extra = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in carried or (requirement.marker is not None and not requirement.marker.evaluate(
                {**environment, "extra": extra})):
            continue
        tested = tested_version(name)
        why = why_carried(requirement, machine, tested)
        if why is None:
            continue
        carried[name] = (tested, why)
        for line in importlib.metadata.requires(name) or []:
            for wanted in ("", *requirement.extras):
                pending.append((Requirement(line), wanted))
    return dict(sorted(carried.items()))


def download(carried: dict[str, Version], out: Path, python_version: str) -> None:
    """Each name==version into `out`: the binary wheel for the machine where one exists, else
    the source distribution, built here into a pure-Python wheel."""
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps",
                        "--python-version", python_version, "--implementation", "cp",
                        *platforms, "--dest", folder,
                        *(f"{name}=={version}" for name, version in carried.items())],
                       check=True)
        for file in sorted(Path(folder).iterdir()):
            if file.suffix == ".whl":
                shutil.move(file, out / file.name)
                continue
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-qq", "--no-deps",
                            "--wheel-dir", str(out), str(file)], check=True)
    for wheel in out.glob("*.whl"):
        name, _, _, tags = parse_wheel_filename(wheel.name)
        if not any(tag.platform == "any" or tag.platform.startswith("manylinux")
                   for tag in tags):
            raise SystemExit(f"error: {wheel.name} was built here for this machine only; the "
                             "GPU machine needs a wheel for manylinux x86_64")


def cuda_build(machine: dict) -> str:
    """The machine's CUDA build, as torch's local label says (cu130 -> "130")."""
    local = (machine.get("torch") or Version("0")).local or ""
    if not local.startswith("cu"):
        raise SystemExit(f"error: gpu/machine.txt gives torch as {machine.get('torch')}; expected "
                         "a CUDA build's version with its local label, such as 2.11.0+cu130")
    return local[2:]


def trim_bitsandbytes(out: Path, cuda: str) -> None:
    """bitsandbytes' wheel with its CPU library and the one for CUDA `cuda` alone (repacked by
    the `wheel` tool, which writes the new RECORD)."""
    for wheel in out.glob("bitsandbytes-*.whl"):
        with tempfile.TemporaryDirectory(prefix="bnb-") as folder:
            subprocess.run([sys.executable, "-m", "wheel", "unpack", "--dest", folder,
                            str(wheel)], check=True, stdout=subprocess.DEVNULL)
            unpacked = next(Path(folder).iterdir())
            kept = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so"}
            libraries = list((unpacked / "bitsandbytes").glob("libbitsandbytes_*.so"))
            if not kept <= {library.name for library in libraries}:
                raise SystemExit(f"error: {wheel.name} has no {' or '.join(sorted(kept))}")
            for library in libraries:
                if library.name not in kept:
                    library.unlink()
            wheel.unlink()
            subprocess.run([sys.executable, "-m", "wheel", "pack", "--dest-dir", str(out),
                            str(unpacked)], check=True, stdout=subprocess.DEVNULL)


def build(out: Path, python_version: str, machine: dict,
          requirements: list[Requirement]) -> dict[str, tuple[Version, str]]:
    """The wheelhouse in `out` (emptied first: two versions of one package stop the install)."""
    carried = carried_packages(requirements, machine, target_environment(python_version))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    download({name: version for name, (version, _) in carried.items()}, out, python_version)
    trim_bitsandbytes(out, cuda_build(machine))
    (out / MANIFEST).write_text("".join(f"{name}=={version}\n"
                                        for name, (version, _) in carried.items()))
    (out / REQUIREMENTS).write_text("".join(f"{requirement}\n" for requirement in requirements))
    return carried


def wheel_sizes(out: Path) -> dict[str, int]:
    """canonical name -> bytes of its wheel in `out`."""
    return {parse_wheel_filename(wheel.name)[0]: wheel.stat().st_size
            for wheel in out.glob("*.whl")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python gpu/wheelhouse.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".whl")
    parser.add_argument("--python-version", default="3.12",
                        help="the Python the wheels are for (the machine's: 3.12)")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version}: expected 3.N, such as 3.12")
    carried = build(args.out, args.python_version, machine_packages(), project_requirements())
    sizes = wheel_sizes(args.out)
    missing = set(carried) - set(sizes)
    if missing:
        raise SystemExit(f"error: no wheel came for {', '.join(sorted(missing))}")
    for name, (version, why) in carried.items():
        print(f"{sizes[name] / MIB:6.2f} MiB  {name}=={version}  ({why})")
    total = sum(sizes.values()) / MIB
    print(f"[gpu-wheels] {len(sizes)} wheels, {total:.1f} MiB in {args.out} "
          f"(limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib:
        print(f"error: the wheelhouse is {total:.1f} MiB, over the {args.limit_mib:g} MiB that "
              "leave room for the tree in a call's 64 MiB; carry less (PINNED, SUBSTITUTES) or "
              "raise --limit-mib", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
