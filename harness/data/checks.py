"""Data config checks, cheap and torch-free, run before any model loads: the cut lengths (a
number of tokens or a percentile), the padding, the format, and a local file's columns.
"""

from harness.core.errors import ConfigError
from harness.core.options import PERCENTILE
from harness.data.sources import FORMATS, read_local

SIDES = {"source": "source_max_length", "target": "target_max_length"}  # side: its config key
PADDINGS = ("longest", "max_length")


def has_text(data_cfg) -> bool:
    """Whether the data has summaries to score with ROUGE (synthetic data is token ids only)."""
    return data_cfg.name != "synthetic"


def check(data_cfg) -> None:
    """Cheap checks of the lengths, the padding and user-supplied data, run before any model is
    loaded."""
    for key in SIDES.values():
        percentile(data_cfg[key], f"data.{key}")
    if data_cfg.padding not in PADDINGS:
        raise ConfigError(f"data.padding={data_cfg.padding!r}; expected longest (each batch "
                          "padded to its longest example) or max_length (every example padded to "
                          "data.source_max_length / target_max_length, as the recipes do)")
    if data_cfg.get("format", "summary") not in FORMATS:
        raise ConfigError(f"data.format={data_cfg.format!r}; expected one of "
                          f"{', '.join(FORMATS)}")
    if data_cfg.name == "local":
        read_local(data_cfg)


def percentile(spec, key: str = "the length") -> float | None:
    """85.0 for `p85`, None for a number of tokens; a ConfigError for anything else."""
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return None
    found = PERCENTILE.fullmatch(spec) if isinstance(spec, str) else None
    if found and 0 < float(found.group(1)) <= 100:
        return float(found.group(1))
    raise ConfigError(f"{key}={spec!r}; expected a positive number of tokens (e.g. 512) or a "
                      "percentile of the tokenized lengths from p1 to p100 (e.g. p85; p100 is "
                      "the longest example)")
