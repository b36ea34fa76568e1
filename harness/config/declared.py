"""How a configuration key is declared (harness/config/schema.py, harness/config/cell_schema.py):
its default and meaning, with the range, choices or check that harness/config/keys.py holds a
composed value against before torch is imported."""

from dataclasses import field
from typing import Any

from omegaconf import MISSING


def key(default: Any, meaning: str, *, choices=None, at_least=None, above=None, at_most=None,
        below=None, expect: str | None = None, check=None):
    """A declared key: its default and what it means; `choices`, or a range (`at_least` /
    `above`, `at_most` / `below`), or `expect` (what a free-form key holds) with `check`: a
    function of the value that says what is wrong with it, or None."""
    metadata = {"meaning": meaning, "choices": choices, "at_least": at_least, "above": above,
                "at_most": at_most, "below": below, "expect": expect, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(default: bool, meaning: str):
    """A key that is true or false, and nothing else: OmegaConf would read `no`, `off` or `0`
    given for a flag as false, which is not what everyone who types them means."""
    return key(default, meaning, expect="true or false", check=_flag)


def _flag(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def named(*names: str):
    """The `name` key of a kind whose options are `names` (it says which option composed it)."""
    return key(MISSING, "the option's name, as the group's choice gives it", choices=names)
