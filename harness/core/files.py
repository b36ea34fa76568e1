"""Files the harness writes where others may read them at once, and digests of what it keys
them by."""

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` into a file beside `path`, then renamed to it: a reader in a parallel
    cell or sweep sees the whole file or none. The partial keeps `path`'s suffix (numpy's savez
    adds .npz to a name without it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial{path.suffix}")
    write(partial)
    partial.replace(path)


def digest(value, length: int) -> str:
    """A stable hex id of a JSON-able value: the same value, the same id, in any process."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


# An experiment's name becomes a folder (reports/<name>/) and a label in MLflow: letters (any
# script), digits, spaces, `.`, `_` and `-`, not starting with a dot or a space.
NAME_MAX = 128


def name_problem(name) -> str | None:
    """What is wrong with `name` as an experiment's name (a folder under reports/), or None."""
    if not isinstance(name, str) or not name:
        return "an empty name"
    if len(name) > NAME_MAX:
        return f"{len(name):,} characters (at most {NAME_MAX})"
    bad = sorted({repr(character) for character in name
                  if not (character.isalnum() or character in " ._-")})
    if bad:
        return f"the character{'s' if len(bad) > 1 else ''} {', '.join(bad[:5])}"
    if name.startswith((".", " ")) or name.endswith(" "):
        return "a name starting with a dot or a space, or ending with a space"
    return None


def inside(folder: Path, name: str) -> Path:
    """folder/name, refused (ValueError) where it would resolve outside `folder`."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{name!r} leads outside {folder}")
    return path
