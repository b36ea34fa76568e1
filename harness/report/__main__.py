"""`python -m harness.report --experiment NAME`: the report of an experiment, from MLflow alone
(harness/report/report.py)."""

import sys

from harness.report.report import main

if __name__ == "__main__":
    sys.exit(main())
