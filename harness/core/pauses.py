"""Explicit pause points, for tests that must catch a process at a known moment rather than
after a step count or a sleep, which a faster machine outruns. Honoured only when the
environment variable HARNESS_TEST_PAUSE names a folder (tests set it; a user never needs it):
at point P the process writes P.reached there, then waits until P.go exists there (or the folder
is gone). tests/conftest.py's `Pauses` is the other side.

The points: `train` (the first optimizer step is done and its train_loss sent), `eval` (training
and its eval loss are done, generation for ROUGE is next).
"""

import os
import time
from pathlib import Path

ENVIRONMENT = "HARNESS_TEST_PAUSE"
LOOK_EVERY_S = 0.05


def at(point: str) -> None:
    folder = os.environ.get(ENVIRONMENT)
    if not folder or not Path(folder).is_dir():
        return
    folder = Path(folder)
    (folder / f"{point}.reached").write_text(str(os.getpid()))
    while folder.is_dir() and not (folder / f"{point}.go").exists():
        time.sleep(LOOK_EVERY_S)
