"""`python -m harness.plan <experiment> [key=value ...]` (make plan): an experiment's plan, nothing
run. The plan itself is harness/sweep/plan.py; this name stays for the command users type. An
experiment that does not exist is refused before the plan's libraries (torch) load."""

import sys

from harness.config.grids import experiment_file
from harness.core.errors import ConfigError, refused

if __name__ == "__main__":
    if sys.argv[1:] and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        try:
            experiment_file(sys.argv[1])
        except ConfigError as error:
            sys.exit(refused(error))
    from harness.sweep.plan import main

    sys.exit(main(sys.argv[1:]))
