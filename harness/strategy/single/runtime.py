"""One process: the model as it is."""

import contextlib

from harness.model.training_step import Updates


def prepare(model, cfg, world):
    """What the training forward calls."""
    return model


def updates(engine, cfg, total_steps: int):
    return Updates(engine.model, cfg, total_steps, engine.world.device)


@contextlib.contextmanager
def evaluating(engine):
    yield engine.model


def state_dict(engine) -> dict | None:
    return None  # the model's own is whole
