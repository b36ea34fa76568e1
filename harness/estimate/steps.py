"""The cell's own training steps, simulated: STEPS steps of its code (harness/model/
training_step.py) on a batch padded to the planned lengths, on PyTorch's meta device as CUDA
would run them (harness/estimate/simulate.py), every tensor traced and every op counted
(harness/estimate/work.py). harness/estimate/estimate.py turns what they saw into the
estimate's parts; the tests run the same steps on real CPU tensors and compare.
"""

import contextlib
from collections import Counter
from typing import NamedTuple

import torch

from harness.core.options import QUANTIZED
from harness.core.units import MIB
from harness.estimate import simulate, work
from harness.measure import accounting
from harness.model import families, methods, models, tokenizers, training_step

META = torch.device("meta")
STEPS = 2  # the second step runs with the optimizer state the first one created


def optimizer_step(steps: "Steps") -> dict:
    """MiB of: the most the optimizer's step allocates beyond what was alive when it began (its
    temporaries: foreach AdamW's whole-model intermediates), and the activations part at the
    peak outside the step. A sharded optimizer steps its shard: harness/estimate/sharding.py
    shares these temporaries out."""
    alive = top_outside = temporaries = 0
    at_outside, at_start = 0, 0
    ends = dict(steps.optimizer_steps)  # start: end
    end = -1
    for index, (_, size) in enumerate(steps.events):
        if index in ends:
            at_start, end = alive, ends[index]
        alive += size
        if index < end:
            temporaries = max(temporaries, alive - at_start)
        elif alive > top_outside:
            top_outside, at_outside = alive, index
    held = simulate.alive_at(steps.events, at_outside)
    outside = (top_outside - steps.bytes_of(held & steps.gradients)
               - steps.bytes_of(held & steps.states))
    return {"step_temporaries": temporaries / MIB, "activations_outside_step": outside / MIB}


def sizes(model, more_blocks: list = ()) -> dict:
    """MiB of: the trained weights as stored and in float32 (DeepSpeed's partitions); the largest
    transformer block (what FSDP2 gathers at once) and its trained part; the largest layer's own
    weights (what ZeRO-3 gathers at once). `more_blocks`: blocks of `model` counted again, once
    for each time listed (a deep model's from a shallow one: harness/estimate/depth.py)."""
    def stored(parameters) -> float:
        return sum(p.numel() * p.element_size() for p in parameters) / MIB

    def state_bytes(weights) -> dict:
        return {tensor.untyped_storage()._cdata: tensor.untyped_storage().nbytes()
                for weight in weights
                for tensor in accounting.quant_state_tensors(getattr(weight, "quant_state",
                                                                     None))}

    repeated = [p for block in more_blocks for p in block.parameters()]
    trained = [p for p in [*model.parameters(), *repeated] if p.requires_grad]
    largest = max(models.blocks(model), key=lambda block: stored(block.parameters()),
                  default=model)
    states = state_bytes(model.parameters())
    # a repeated block's own states (not those blocks share: bitsandbytes' code map)
    uses = Counter(address for block in models.blocks(model)
                   for address in state_bytes(block.parameters())) if more_blocks else {}
    more_states = sum(size for block in more_blocks
                      for address, size in state_bytes(block.parameters()).items()
                      if uses[address] == 1)
    return {"quantization_state": (sum(states.values()) + more_states) / MIB,  # on every rank
            "trained_weights": stored(trained),
            "trained_weights_fp32": sum(p.numel() for p in trained) * 4 / MIB,
            "largest_block": stored(largest.parameters()),
            "largest_block_trained": stored(p for p in largest.parameters() if p.requires_grad),
            "largest_layer": max((stored(module.parameters(recurse=False))
                                  for module in model.modules()), default=0.0)}



class Steps(NamedTuple):
    """What simulated_steps saw: the weights' sizes, every later allocation and free in order
    (simulate.Trace's events), which of them were gradients and optimizer state, and the spans
    of events inside the optimizer's steps ([start, end) indices), and the last step's ops
    (work.Work's)."""
    weights: list
    events: list
    sizes: dict
    gradients: set
    states: set
    optimizer_steps: list = []
    ops: Counter = Counter()
    calls: Counter = Counter()
    # With marks.Marks: the block of each weight storage and of each event
    weight_marks: list = []
    event_marks: list = []

    def bytes_of(self, serials) -> int:
        return sum(self.sizes[serial] for serial in serials)


def simulated_steps(model, cfg, lengths: dict, device: torch.device,
                    on_cuda: simulate.AsOnCuda | None = None,
                    reuse_outputs: bool = True, marks=None) -> Steps:
    """STEPS training steps of the cell's own code on a batch padded to `lengths`, every tensor
    traced. On the meta device for the estimate; on the CPU, the same steps for real (the tests
    check that both see the same allocations). `reuse_outputs`: see simulate.Trace."""
    weights = _weight_storages(model)
    on_cpu = on_cuda is not None and on_cuda.on_cpu  # a CPU's step: estimate.step_work
    trace = simulate.Trace(existing=weights.values(), reuse_outputs=reuse_outputs, marks=marks)
    counted = work.Work(random_apart=on_cpu, signatures=on_cpu, marks=marks)
    gradients, states = set(), set()
    with trace, on_cuda or contextlib.nullcontext():
        batch = families.of(cfg.model).training_batch(cfg.train.batch_size, lengths, device,
                                                      tokenizers.PAD_ID, tokenizers.EOS_ID + 1)
        # LOMO frees each fused gradient inside backward: note them as they appear (registered
        # first, so that these hooks run before the updates' own).
        hooks = [weight.register_post_accumulate_grad_hook(
            lambda weight: gradients.add(trace.serial_of(weight.grad)))
            for weight in methods.fused_parameters(model, cfg.method.name)]
        # auto: what torch.optim picks, foreach on CUDA and tensor by tensor on a CPU.
        simulated = {"auto": "for_loop" if on_cpu else "foreach",
                     "fused": "for_loop"}.get(cfg.train.optimizer_impl,
                                              cfg.train.optimizer_impl)
        updates = training_step.Updates(model, cfg, STEPS, device, implementation=simulated,
                                        loss_scaling=False, paging=False)
        spans = []

        def stepping(*_) -> None:  # where the optimizer's temporaries live, and its work
            spans.append([len(trace.events), None])
            counted.phase = "update"

        def stepped(*_) -> None:
            spans[-1][1] = len(trace.events)
            counted.phase = "pass"

        if updates.optimizer is not None:
            updates.optimizer.register_step_pre_hook(stepping)
            updates.optimizer.register_step_post_hook(stepped)
        model.train()
        for step in range(STEPS):
            # The work of a step with optimizer state: counted in the last step only (a dispatch
            # mode costs every op it sees).
            with counted if step == STEPS - 1 else contextlib.nullcontext():
                counted.recording = step == STEPS - 1
                updates.backward(training_step.forward(model, batch, "fp32", device),
                                 update=True)
                gradients.update(trace.serial_of(p.grad) for p in model.parameters()
                                 if p.grad is not None)
                if updates.optimizer is not None:
                    states.update(trace.serial_of(value)
                                  for state in updates.optimizer.state.values()
                                  for value in state.values() if isinstance(value, torch.Tensor))
                updates.next_step()
        updates.close()
        for hook in hooks:
            hook.remove()
    return Steps([storage.nbytes() for storage in weights.values()], trace.events, trace.sizes,
                 gradients - {None}, states - {None}, [tuple(span) for span in spans],
                 counted.ops, counted.calls,
                 [marks.of_storage.get(address) for address in weights] if marks else [],
                 trace.event_marks)


def meta_model(cfg, on_cuda: simulate.AsOnCuda):
    """The cell's model on the meta device, stored and prepared as harness/cell/recipe.py does. A
    checkpointed block is recomputed inside backward, where the forward's function modes are not
    active: it gets `on_cuda` of its own, as on CUDA checkpointing re-enters autocast."""
    with torch.device(META):
        model = models.random_model(cfg.model, models.stored_dtype(
            cfg.precision, methods.base_frozen(cfg.method.name)))
    if cfg.precision.name in QUANTIZED:
        _quantize(model, cfg.precision)
    return methods.prepare(model, cfg, context_fn=lambda: (contextlib.nullcontext(), on_cuda))


def _quantize(model, precision_cfg) -> None:
    """bitsandbytes layers where from_pretrained puts them (transformers' own bitsandbytes
    quantizer chooses): LLM.int8, an int8 weight and a float32 scale per row; 4-bit, the weight
    quantized by bitsandbytes' own quantize_4bit (whose meta version gives the packed weight and
    its scales)."""
    import bitsandbytes as bnb  # imported here: only quantized cells need it
    from transformers.quantizers import AutoHfQuantizer

    # bitsandbytes caches its double quantization's code map on the device of the first tensor
    # it quantizes: made here on the CPU, a meta copy is not what later real loads get.
    bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    # uint8 storage: a strategy's float storage packs the same bytes (harness/model/models.py).
    settings = models.quantization(precision_cfg)
    AutoHfQuantizer.from_config(settings).preprocess_model(model, device_map={"": META})
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            layer.weight.CB = layer.weight.data
            layer.weight.SCB = torch.empty(layer.out_features, device=META)
            # Outlier columns depend on the data, which meta tensors do not have: none here.
            layer.state.threshold = 0.0
        elif isinstance(layer, bnb.nn.Linear4bit):
            full = torch.empty(layer.out_features, layer.in_features, device=META)
            packed, state = bnb.functional.quantize_4bit(
                full, blocksize=layer.weight.blocksize,
                compress_statistics=settings.bnb_4bit_use_double_quant,
                quant_type=settings.bnb_4bit_quant_type)
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state,
                                             blocksize=layer.weight.blocksize,
                                             compress_statistics=state.nested,
                                             quant_type=state.quant_type, bnb_quantized=True,
                                             module=layer)


def _weight_storages(model) -> dict:
    """Every storage the model holds before training, once each: weights, buffers, the int8
    layers' row scales and the 4-bit layers' block scales."""
    tensors = [*accounting.weight_tensors(model), *model.buffers()]
    return {tensor.untyped_storage()._cdata: tensor.untyped_storage() for tensor in tensors}
