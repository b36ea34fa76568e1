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
