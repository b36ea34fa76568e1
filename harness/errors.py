"""The one error type for bad input: it names the value, what was expected and what to do."""


class ConfigError(ValueError):
    """Bad input (config value, data file, invalid cell), raised before any expensive work."""
