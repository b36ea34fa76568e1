"""`python -m harness [--debug] [group=option ...] [key=value ...]`: one cell, or a grid with -m.

Experiments are primary configs under experiments/: `python -m harness -cd experiments -cn demo`.
It exits with its cell's outcome, a sweep with its most severe cell's (harness/core/errors.py,
docs/exit-codes.md): 0 ok, 2 refused, 3 failed, 4 oom, 5 diverged, 6 incomplete, 128 + N killed
by signal N, 1 a bug of the harness (with its traceback). A refusal is one line on stderr;
--debug (or HARNESS_DEBUG=1) shows its traceback too.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.config import keys, validation
from harness.core.errors import EXIT_CODES, ConfigError, exit_code, refused
from harness.core.options import CONF_DIR
from harness.run import preflight, process
from harness.run.stops import Stopped


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> str:
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        checked = preflight.planned(cfg)  # a sweep's plan checked every cell already
        if checked is None:
            # A bad value is refused before torch, transformers and bitsandbytes load (seconds).
            validation.validate(cfg, sweep)
            reason = None if sweep else validation.invalid_cell_reason(cfg)
            if reason:
                raise ConfigError(reason)
        process.head_start(cfg.runner.start_method)  # the cells' server loads meanwhile
        from harness.run import runner

        status = runner.run(cfg, checked)
    except ConfigError as error:
        code = refused(error)
        if sweep:  # a sweeper without a plan: this grid point is refused, the others run
            return "refused"
        sys.exit(code)
    except Stopped as stop:  # the run is closed as killed; exit as a process stopped by it
        print(f"[harness] {stop.reason}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    if not sweep and exit_code([status]):  # a sweep exits after its summary
        sys.exit(exit_code([status]))
    return status


def cli() -> None:
    """main(), with what Hydra refuses while composing said as every refusal is (one line,
    exit 2), and credentials in an argument refused before Hydra writes its output folder."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HARNESS_DEBUG"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises, and `keys.refusal` words it
    try:
        validation.check_arguments(sys.argv[1:])
        main()
    except Exception as error:  # noqa: BLE001 - a bad input is refused, anything else is a bug
        found = keys.refusal(error)
        if found is None:
            raise
        sys.exit(refused(found))
    assert EXIT_CODES["ok"] == 0


if __name__ == "__main__":
    cli()
