"""Explicit pause points, for tests that must catch a process at a known moment rather than
after a step count or a sleep, which a faster machine outruns. Honoured only when the
environment variable HARNESS_TEST_PAUSE names a folder (tests set it; a user never needs it).

At point P a process returns at once where P.go exists in that folder (the point is let go for
every process). Else it writes P.<pid>.reached, a JSON record of who waits there (its pid, its
cell's train.seed, which tells the cells of a sweep apart, and its rank), and waits until P.go or
P.<pid>.go exists (or the folder is gone). tests/conftest.py's `Pauses` is the other side.
"""

import json
import os
import time
from pathlib import Path

ENVIRONMENT = "HARNESS_TEST_PAUSE"
LOOK_EVERY_S = 0.05
# train: the first optimizer step is done and its train_loss sent. eval: training and its eval
# loss are done, generation for ROUGE is next.
POINTS = ("train", "eval")


def at(point: str, seed: int, rank: int = 0) -> None:
    folder = os.environ.get(ENVIRONMENT)
    if not folder or not Path(folder).is_dir():
        return
    folder, pid = Path(folder), os.getpid()
    released = (folder / f"{point}.go", folder / f"{point}.{pid}.go")
    if released[0].exists():
        return
    record = folder / f"{point}.{pid}.reached"
    written = record.with_suffix(".writing")  # renamed whole: a reader never sees half of it
    written.write_text(json.dumps({"pid": pid, "seed": seed, "rank": rank}))
    written.rename(record)
    while folder.is_dir() and not any(path.exists() for path in released):
        time.sleep(LOOK_EVERY_S)
