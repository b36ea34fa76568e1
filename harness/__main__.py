"""`python -m harness [group=option ...] [key=value ...]`: one cell, or a grid with -m.

Experiments are primary configs under experiments/: `python -m harness -cd experiments -cn demo`.
"""

import sys

import hydra
from omegaconf import DictConfig

from harness.config import validation
from harness.core.errors import ConfigError, refused
from harness.run import checks, process
from harness.run.stops import Stopped


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:
        checked = checks.planned(cfg)  # a sweep's plan checked every cell already
        if checked is None:
            # A bad value is refused before torch, transformers and bitsandbytes load (seconds).
            validation.validate(cfg)
        process.head_start(cfg.runner.start_method)  # the cells' server loads meanwhile
        from harness.run import runner

        return runner.run(cfg, checked)
    except ConfigError as error:
        sys.exit(refused(error))
    except Stopped as stop:  # the run is closed as killed; exit as a process stopped by it
        print(f"[harness] {stop.reason}", file=sys.stderr)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
