"""`python -m harness [group=option ...] [key=value ...]`: one cell, or a grid with -m.

Experiments are primary configs under experiments/: `python -m harness -cd experiments -cn demo`.
"""

import sys

import hydra
from omegaconf import DictConfig

from harness import cell_process, config
from harness.errors import ConfigError
from harness.stops import Stopped


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:
        # A bad value is refused before torch, transformers and bitsandbytes load (seconds).
        config.validate(cfg)
        cell_process.head_start(cfg.runner.start_method)  # the cells' server loads meanwhile
        from harness import runner

        return runner.run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:  # the run is closed as killed; exit as a process stopped by it
        print(f"[harness] {stop.reason}", file=sys.stderr)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
