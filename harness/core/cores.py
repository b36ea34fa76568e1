"""The CPU cores this process may use, for the work the harness shares out among forked workers
(a large grid's composition, a plan's simulations)."""

import os


def usable_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
