"""How the runner starts a cell's process (runner.start_method), and the head start it gets.

`auto` is `spawn` where CUDA is available (a bare interpreter, which can initialise CUDA itself)
and `forkserver` elsewhere: every cell forks from a server that has imported torch and
transformers once. That server can start before the runner has imported them too: the two
imports then run side by side (seconds saved for every single run on a machine with two cores).
"""

import multiprocessing
import multiprocessing.forkserver

from harness.sampler import init_nvml

PRELOADED = ["harness.cell"]  # the forkserver imports this, and all it imports, once


def context(configured: str, cuda: bool):
    """The multiprocessing context that starts cells: `configured` (runner.start_method), with
    `auto` resolved by whether this process has CUDA."""
    method = ("spawn" if cuda else "forkserver") if configured == "auto" else configured
    if multiprocessing.get_start_method(allow_none=True) not in (
            None, *multiprocessing.get_all_start_methods()):
        # In a joblib worker the global start method is loky's own, which a process started by
        # the standard library cannot find; this process starts only cells and their server.
        multiprocessing.set_start_method(method, force=True)
    chosen = multiprocessing.get_context(method)
    if method == "forkserver":
        chosen.set_forkserver_preload(PRELOADED)
    return chosen


def head_start(configured: str) -> None:
    """Start the forkserver now where the cell will fork from it: `forkserver`, or `auto` on a
    machine where NVML finds no GPU (the runner decides by torch.cuda later; where the two
    disagree, the server goes unused). Called before this process imports torch."""
    if configured == "spawn" or (configured == "auto" and _nvml_finds_a_gpu()):
        return
    context(configured, cuda=False)
    multiprocessing.forkserver.ensure_running()


def _nvml_finds_a_gpu() -> bool:
    nvml = init_nvml()
    return nvml is not None and nvml.nvmlDeviceGetCount() > 0
