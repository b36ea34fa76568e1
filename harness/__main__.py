"""`python -m harness [group=option ...] [key=value ...]`: one cell, or a grid with -m.

Experiments are primary configs under experiments/: `python -m harness -cd experiments -cn demo`.
"""

import sys

import hydra
from omegaconf import DictConfig

from harness import runner
from harness.errors import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:
        return runner.run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
