"""`python -m harness.estimate <overrides>`: one cell's estimated peak GPU memory, its parts as JSON
last (harness/estimate/estimate.py)."""

import sys

from harness.estimate.estimate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
