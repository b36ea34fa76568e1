"""The one error type for bad input: it names the value, what was expected and what to do."""

import sys


class ConfigError(ValueError):
    """Bad input (config value, data file, invalid cell), raised before any expensive work."""


def refused(error: ConfigError) -> int:
    """Say why a command refuses its input, as every entry point says it (`error: ...` on
    stderr); the exit status for it, 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2
