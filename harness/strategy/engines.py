"""How a cell's model trains under its strategy: `Engine` holds the model and what its strategy's
engine (harness/strategy/<engine>/runtime.py, found by harness/strategy/registry.py) made of it:
what the training forward calls, how a loss becomes updated weights, how the model is evaluated
and saved afterwards."""

from harness.strategy import registry
from harness.strategy import world as ranks
from harness.strategy.world import World


class Engine:
    """The model under its strategy. `model` is the transformers (or peft) model, `trained` what
    the training forward calls; updates(cfg, total_steps) builds how a loss updates the weights."""

    def __init__(self, model, cfg, world: World = ranks.SINGLE):
        self.model, self.world, self.strategy = model, world, cfg.strategy
        self.runtime = registry.runtime(cfg.strategy.name)
        ranks.broadcast_weights(model, world)
        self.trained = self.runtime.prepare(model, cfg, world)

    def updates(self, cfg, total_steps: int):
        return self.runtime.updates(self, cfg, total_steps)

    def evaluating(self):
        """The model to evaluate and generate with (a context). Every rank runs the same
        evaluation on the same examples: a sharded model's forward is a collective."""
        return self.runtime.evaluating(self)

    def state_dict(self) -> dict | None:
        """The whole model's weights on this rank (gathered from every rank's shards), for saving
        an adapter; None where the model's own state_dict is whole already."""
        return self.runtime.state_dict(self)
