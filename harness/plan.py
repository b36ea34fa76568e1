"""`python -m harness.plan <experiment> [key=value ...]` (make plan): an experiment's plan, nothing
run. The plan itself is harness/sweep/plan.py; this name stays for the command users type."""

import sys

from harness.sweep.plan import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
