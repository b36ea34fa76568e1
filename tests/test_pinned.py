"""The numbers training computes, pinned: the loss of each of the first steps of a tiny seq2seq and
a tiny causal cell, per method, on the CPU. A change that moves any of them by more than one part
in a million fails here and has to say why. Not less: that is about ten float32 roundings, and the
same code on a CPU of another make rounds otherwise (on an AMD EPYC against the Intel Xeon that
pinned them, t5-tiny's losses moved by one or two roundings: 1.9e-6 to 3.8e-6 at 14 to 25).
Update a pin only in the commit that changes what a step computes on purpose (the models' random
initialisation, the synthetic data, the batching or shuffling, the loss, an optimizer or the LOMO
update, the default hyperparameters), and say in that commit why the numbers moved. A library
upgrade (torch, transformers, peft) that moves them is a change to state too: rerun this file with
`-s` to see the new values.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from harness.cell.train import train
from harness.data import encoding, loaders
from harness.model import families, methods, models
from harness.strategy.engines import Engine
from tests.conftest import compose_cell

CPU = torch.device("cpu")
STEPS = 4
# (model, method): the train_loss logged at steps 1..STEPS (batch 4, lr 1e-3, seeds as composed).
PINNED = {
    ("t5-tiny", "full"): [24.97498893737793, 17.434803009033203, 15.856365203857422,
                          13.892350196838379],
    ("t5-tiny", "lora"): [24.974987030029297, 23.21547508239746, 23.2578125, 23.300249099731445],
    ("t5-tiny", "lomo"): [24.97498893737793, 23.902814865112305, 24.144309997558594,
                          24.916929244995117],
    ("tiny-llama", "full"): [5.9230732917785645, 5.709794998168945, 5.629873275756836,
                             5.553032398223877],
    ("tiny-llama", "lora"): [5.9230732917785645, 5.929738998413086, 5.941775321960449,
                             5.943708419799805],
    ("tiny-llama", "lomo"): [5.9230732917785645, 5.934726238250732, 5.950340270996094,
                             5.956583023071289],
}


@pytest.fixture
def one_thread():
    """One CPU thread: a matmul split across threads sums in another order, which moves a loss
    by a few 1e-6 (t5-tiny's LOMO at step 3: 3.8e-6 between one thread and two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(tmp_path, model: str, method: str) -> list[float]:
    cfg = compose_cell(f"model={model}", f"method={method}", "data.train_size=16",
                       "data.validation_size=4", "data.test_size=4", "train.batch_size=4",
                       f"train.max_steps={STEPS}", "train.lr=1e-3")
    tokenizer = models.load_tokenizer(cfg.model)
    model_ = methods.prepare(models.load_model(cfg.model, cfg.precision.name,
                                               methods.base_frozen(cfg.method.name), CPU), cfg)
    splits = encoding.load(cfg.data, cfg.model, tokenizer, str(tmp_path)).splits
    collate = families.of(cfg.model).collate(tokenizer)
    # The cell's own loader (harness/data/loaders.py): shuffled by a generator of train.seed.
    batches = [loaders.training(splits["train"], 4, cfg.train.seed, collate),
               DataLoader(splits["validation"], batch_size=4, collate_fn=collate)]
    logged = []
    train(Engine(model_, cfg), *batches, cfg, CPU, lambda metrics, step: logged.append(metrics))
    return [metrics["train_loss"] for metrics in logged if "train_loss" in metrics]


@pytest.mark.parametrize("model", ["t5-tiny", "tiny-llama"])
@pytest.mark.parametrize("method", ["full", "lora", "lomo"])
def test_the_first_losses_of_each_method_are_as_pinned(tmp_path, one_thread, model, method):
    losses = _losses(tmp_path, model, method)
    print(f"    ({model!r}, {method!r}): {losses!r},")
    assert len(losses) == STEPS
    assert losses == pytest.approx(PINNED[model, method], rel=1e-6, abs=0)
