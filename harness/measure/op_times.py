"""What each op of a simulated step takes on this device, measured by running it: the calibrated
time model's figures for a step on the machine at hand (harness/estimate/timing.py), as Habitat
(USENIX ATC '21) measures a model's operations one by one.

The simulated step (harness/estimate/steps.py) records every op it calls with the shapes, strides
and dtypes of its arguments (harness/estimate/work.py's signature). Here each distinct call is
made again on real tensors of those shapes: floating-point values drawn in [0, 1) (no NaNs, no
denormals), integers zero (a valid index for an embedding, a loss target, a gather), booleans
false. Its time is the best over a few passes through copies of its arguments that span more than
the caches hold, as in a step, where the ops between two uses of a tensor evict it (harness/
measure/calibration.py measures its curves the same way). The time includes the dispatcher's, as
the step's ops do; what a step spends outside its ops (Python, autograd's graph, module hooks) is
left out: harness/estimate/host_time.py measures it.

A call that cannot be made again (an argument that is not a tensor, a number or a list of them)
costs the host's time per op instead (harness/estimate/timing.py). The figures are cached per
device, torch version and thread count beside the calibration: a cell measured once is predicted
at once after.
"""

import json
from pathlib import Path

import torch

from harness.core.files import write_whole
from harness.measure import calibration

VERSION = 1  # a change to how a call is measured measures anew
PASS_S = 0.005  # per call: passes at least this long, at least PASSES of them
PASSES = 3


def seconds(signatures: list[str], device: torch.device, cache: Path | None = None) -> dict:
    """{signature: seconds per call, or None where it cannot be made again} for each distinct
    signature, from the cache where measured before, else measured now (and cached)."""
    path = _path(device, cache)
    known = json.loads(path.read_text()) if path.exists() else {}
    missing = sorted(set(signatures) - set(known))
    for signature in missing:
        known[signature] = measure(signature, device)
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, lambda partial: partial.write_text(json.dumps(known)))
    return {signature: known[signature] for signature in signatures}


def measure(signature: str, device: torch.device) -> float | None:
    """Seconds per call of the op `signature` describes, on real tensors; None where it cannot
    be made (an argument it cannot build, an op this device refuses)."""
    name, args, kwargs = json.loads(signature)
    try:
        func = _op(name)
        copies = calibration.copies(max(1, _bytes(args) + _bytes(kwargs)))
        calls = [(_built(args, device), _built(kwargs, device)) for _ in range(copies)]
        with torch.no_grad():
            return calibration.timed([lambda call=call: func(*call[0], **call[1])
                                      for call in calls], device, PASS_S, PASSES)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, _Unbuildable):
        return None


class _Unbuildable(Exception):
    pass


def _op(name: str):
    """torch.ops' op for "aten::mm.default" or "aten::add.Tensor"."""
    namespace, _, rest = name.partition("::")
    packet, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet), overload)


def _built(value, device: torch.device):
    if isinstance(value, dict):
        return {name: _built(item, device) for name, item in value.items()}
    if isinstance(value, list) and value and value[0] == "tensor":
        _, shape, stride, offset, dtype, elements = value
        return _tensor(shape, stride, offset, getattr(torch, dtype), elements, device)
    if isinstance(value, list) and value and value[0] == "dtype":
        return getattr(torch, value[1])
    if isinstance(value, list) and value and value[0] == "device":
        return device
    if isinstance(value, list) and value and value[0] == "unknown":
        raise _Unbuildable(value[1])
    if isinstance(value, list):
        return [_built(item, device) for item in value]
    return value


def _tensor(shape, stride, offset, dtype, elements, device) -> torch.Tensor:
    storage = torch.empty(max(elements, 1), dtype=dtype, device=device)
    if dtype.is_floating_point or dtype.is_complex:
        storage.uniform_(0, 1)
    else:
        storage.zero_()
    return storage.as_strided(shape, stride, offset)


def _bytes(value) -> int:
    if isinstance(value, dict):
        return sum(_bytes(item) for item in value.values())
    if isinstance(value, list) and value and value[0] == "tensor":
        return value[5] * getattr(torch, value[4]).itemsize
    if isinstance(value, list):
        return sum(_bytes(item) for item in value if isinstance(item, (list, dict)))
    return 0


def _path(device: torch.device, cache: Path | None) -> Path:
    found = calibration.path(device, cache)
    return found.with_name(found.name.replace("calibration-", f"op-times-v{VERSION}-", 1))
