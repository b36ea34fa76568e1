"""The outputs of an op on meta tensors, made again from its shapes once seen: what makes a
simulated step (harness/estimate/simulate.py) about twice as fast.

A meta tensor has no data, so what an op returns depends only on the op and the shapes, strides
and dtypes of its arguments (and their other values: a dim, a dtype, a scale). PyTorch computes
it with the op's meta kernel, most of them written in Python (torch/_refs, torch/_prims), which is
most of a simulation's time; a transformer repeats the same ops on the same shapes in every block
and every step. `MetaOutputs` keeps the sizes, strides and dtypes of what an op returned and, when
the same op meets arguments of the same description again, returns fresh empty tensors of those,
as the meta kernel would have.

Only ops whose outputs are new tensors qualify: no argument written or aliased and no output
aliasing one, by the op's schema; an op whose output nonetheless shares an input's storage
(`_unsafe_view` declares no alias), starts inside its storage or holds more of it than its shape
needs is run by its kernel from then on. Views and in-place ops always run their kernels. So the
simulated step allocates and frees exactly what it did (tests/test_estimate.py compares both).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

META = torch.device("meta")


class SimulationMode(TorchDispatchMode):
    """A dispatch mode of the simulation (simulate.Trace, work.Work). torch wraps a mode's
    __torch_dispatch__ in a guard that keeps torch.compile out of it, at a few microseconds a
    call: about 6 % of a simulation, which calls it some 200,000 times. Nothing in a simulation is
    compiled, so these modes go without it (torch's documented switch)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class MetaOutputs:
    """Call `outputs(func, args, kwargs)` where a dispatch mode would call func(*args, **kwargs)."""

    def __init__(self):
        self.seen = {}  # (op, the arguments' description): ((size, stride, dtype), ...) returned
        self.qualifies = {}  # op: whether its outputs may be made from their description

    def __call__(self, func, args: tuple, kwargs: dict):
        qualifies = self.qualifies.get(func)
        if qualifies is None:
            qualifies = self.qualifies[func] = _returns_new_tensors(func)
        key = _described((func, args, kwargs)) if qualifies else None
        if key is None:
            return func(*args, **kwargs)
        try:
            returned = self.seen.get(key)
        except TypeError:  # a value in it that cannot be a key
            return func(*args, **kwargs)
        if returned is not None:
            made = tuple(None if output is None else torch.empty_strided(
                output[0], output[1], dtype=output[2], device=META) for output in returned)
            return made[0] if len(made) == 1 else made
        out = func(*args, **kwargs)
        results = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if _fresh([tensor for tensor in results if tensor is not None], args, kwargs):
            # A backward op returns None for a gradient its output mask leaves out.
            self.seen[key] = tuple(None if tensor is None else
                                   (tuple(tensor.shape), tensor.stride(), tensor.dtype)
                                   for tensor in results)
        else:
            self.qualifies[func] = False
        return out


def tensors_in(value) -> list:
    """The tensors in an op's arguments or outputs (nested tuples, lists and dicts), in the order
    torch's pytree flattens them; much cheaper than tree_flatten, which a dispatch mode would call
    for every op of a step."""
    if isinstance(value, torch.Tensor):
        return [value]
    found = []
    _collect(value, found)
    return found


def mapped(value, function):
    """`value` with `function` applied to each leaf of its nested tuples, lists and dicts (a
    tuple subclass such as torch.Size is a leaf): torch's tree_map for an op's arguments, which
    a simulation calls thousands of times (autocast's casts, the FLOP formulas' shapes), at a
    fraction of its cost."""
    kind = type(value)
    if kind is tuple or kind is list:
        return kind([mapped(item, function) for item in value])
    if kind is dict:
        return {name: mapped(item, function) for name, item in value.items()}
    return function(value)


def _collect(value, found: list) -> None:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)


def _returns_new_tensors(func) -> bool:
    schema = func._schema
    return (func.namespace == "aten" and not func.is_view and bool(schema.returns)
            and all(argument.alias_info is None for argument in schema.arguments)
            and all(result.alias_info is None and str(result.type) == "Tensor"
                    for result in schema.returns))


class _NotMeta(Exception):
    pass


def _described(value):
    """A hashable description of an op's arguments: a tensor by its shape, stride, offset and
    dtype, anything else by its value; None where a tensor is not a meta tensor (real data) or
    none is a tensor (a factory's device may be the default one). A value that cannot be a key
    makes it unhashable (the caller's lookup says so: a description is not hashed twice)."""
    tensors = []
    try:
        key = _describe(value, tensors)
    except _NotMeta:
        return None
    return key if tensors else None


def _describe(value, tensors: list):
    # Called for every argument of every op of a step: list comprehensions, not generators.
    if isinstance(value, torch.Tensor):
        if not value.is_meta:
            raise _NotMeta
        tensors.append(value)
        return (value.shape, value.stride(), value.storage_offset(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *[_describe(item, tensors) for item in value])
    if isinstance(value, dict):
        return ("dict", *[(name, _describe(value[name], tensors)) for name in sorted(value)])
    return value


def _fresh(results: list, args: tuple, kwargs: dict) -> bool:
    """Whether each output is a meta tensor with a storage of its own, exactly the size an empty
    tensor of its shape and strides gets, and starts at its beginning."""
    inputs = {tensor.untyped_storage()._cdata for tensor in tensors_in((args, kwargs))}
    storages = [tensor.untyped_storage() for tensor in results]
    if len({storage._cdata for storage in storages}) < len(storages):
        return False
    return all(tensor.is_meta and storage._cdata not in inputs and tensor.storage_offset() == 0
               and storage.nbytes() == torch.empty_strided(
                   tensor.shape, tensor.stride(), dtype=tensor.dtype,
                   device=META).untyped_storage().nbytes()
               for tensor, storage in zip(results, storages))
