"""Where each strategy's engine lives: one folder per engine under harness/strategy/ (single/,
ddp/, fsdp/, zero/), holding all it knows: plan.py, its rules, what each rank holds and what it
moves per step (no torch: the checks before a run and the plan read it), and runtime.py, how it
trains, evaluates and saves a model. Adding a strategy is adding a folder: its plan's NAMES say
which options of conf/strategy/ it runs.
"""

import functools
import importlib
import pkgutil
from pathlib import Path


@functools.cache
def _engines() -> dict:
    """{strategy name: the engine folder that runs it}, from every folder's plan.NAMES."""
    found = {}
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.ispkg:
            for name in importlib.import_module(f"{__package__}.{module.name}.plan").NAMES:
                found[name] = module.name
    return found


def plan(strategy_name: str):
    """The engine's plan module (rules, memory per rank, transfers) for a strategy name."""
    return importlib.import_module(f"{__package__}.{_engines()[strategy_name]}.plan")


def runtime(strategy_name: str):
    """The engine's runtime module for a strategy name (imports torch)."""
    return importlib.import_module(f"{__package__}.{_engines()[strategy_name]}.runtime")


def names() -> tuple:
    return tuple(_engines())


def shards_weights(strategy) -> bool:
    """Whether the strategy shards the weights themselves, not only their gradients and
    optimizer state: a quantized weight must then be a tensor it can cut."""
    return plan(strategy["name"]).shards_weights(strategy)
