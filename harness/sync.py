"""Deliver what runs journaled and could not deliver: `python -m harness.sync` (or `make sync`).

A run whose tracking store did not answer by the time its cell ended keeps the rest of its
writes in its journal (tracking.journal_dir, one folder per run; harness/tracking/journal.py).
This replays every pending journal into the store it was meant for, comparing each entry with
what the store holds, so that running it twice, or after a run that delivered part, writes
nothing twice. A journal whose store still does not answer stays, and the exit code is 6
(incomplete: docs/exit-codes.md).

    python -m harness.sync [--journal-dir .harness/journal] [--tracking-uri URI]
"""

import argparse
import sys
from pathlib import Path

from mlflow import MlflowClient

from harness.core.errors import EXIT_CODES
from harness.tracking import journal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--journal-dir", default=".harness/journal",
                        help="where runs journal (tracking.journal_dir)")
    parser.add_argument("--tracking-uri", default=None,
                        help="deliver into this store instead of the one each run names (the "
                             "same server under another address)")
    args = parser.parse_args(argv)
    pending = journal.pending(Path(args.journal_dir))
    if not pending:
        print(f"[harness] nothing to deliver: no pending journal in {args.journal_dir}")
        return 0
    left = 0
    for folder in pending:
        found = journal.header(folder)
        uri = args.tracking_uri or found["tracking_uri"]
        try:
            count = journal.replay(folder, MlflowClient(uri))
        except Exception as error:  # noqa: BLE001 - the store does not answer: try the next
            left += 1
            print(f"[harness] run {found['run_id']}: not delivered to {uri} "
                  f"({type(error).__name__}: {str(error)[:200]}); still kept in {folder}")
            continue
        print(f"[harness] run {found['run_id']}: {count} journal entries delivered to {uri}")
    if left:
        print(f"[harness] {left} of {len(pending)} runs still pending: run this again once "
              "their store answers")
    return EXIT_CODES["incomplete"] if left else 0


if __name__ == "__main__":
    sys.exit(main())
