"""The memory sampler (a real process watching a real process), its NVML path against a fake
NVML (no GPU here), the trace's peaks, series and plot, and the breakdown of live tensors."""

import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from harness.core.units import MIB
from harness.measure import accounting, host_peak, sampler, traces
from harness.measure.sampler import Sampler
from tests.conftest import requires_cuda

SPIKE_MIB = 300
# On a line from stdin, writes SPIKE_MIB of (resident) memory and says "holding"; frees it on the
# next line (or the end of its stdin): a spike as long as its caller holds it, however slow the
# machine.
SPIKE = textwrap.dedent(f"""
    import sys, time
    sys.stdin.readline()
    time.sleep(0.3)  # its baseline, sampled first
    spike = bytearray(b"x") * ({SPIKE_MIB} * 1024 * 1024)
    print("holding", flush=True)
    sys.stdin.readline()
    del spike
    time.sleep(0.3)
""")


def _trace_of(script: str, out, timeout_s: float, hold_s: float | None = None):
    """The real sampler's trace of `python -c script`, which starts on a line from stdin; with
    `hold_s`, a SPIKE-like script, held for that long once it says it holds its memory."""
    sampler = traces.SamplerProcess(interval_ms=10, out=out)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        sampler.watch(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        if hold_s is not None:
            assert child.stdout.readline().strip() == "holding"
            time.sleep(hold_s)
        child.stdin.close()
        assert child.wait(timeout=timeout_s) == 0
    finally:
        sampler.stop()
    return traces.read_trace(out, [])


def test_the_sampler_catches_a_50_ms_host_allocation_spike(tmp_path):
    trace = _trace_of(SPIKE, tmp_path / "trace.csv", timeout_s=30, hold_s=0.05)
    baseline = trace["cpu_mib"].iloc[:5].median()
    assert trace["cpu_mib"].max() - baseline > 0.9 * SPIKE_MIB
    assert trace["cpu_mib"].iloc[-5:].max() - baseline < 0.2 * SPIKE_MIB  # and its end
    assert trace["gpu_mib"].isna().all() and trace.attrs["gpu_source"] is None
    assert np.median(np.diff(trace["time_s"])) < 0.02


def test_the_kernels_high_water_mark_keeps_a_spike_no_sample_saw_until_reset():
    assert host_peak.reset()
    before = host_peak.mib()
    spike = bytearray(b"x") * (SPIKE_MIB * MIB)  # resident at once, and gone at once
    del spike
    kept = host_peak.mib()
    assert kept - before > 0.9 * SPIKE_MIB
    assert host_peak.reset() and host_peak.mib() < kept - 0.5 * SPIKE_MIB


def test_sampled_peaks_are_raised_to_the_cells_high_water_marks_never_lowered():
    sampled = {"cpu_peak_mib": 500.0, "cpu_load_peak_mib": 400.0, "cpu_train_peak_mib": 500.0,
               "cpu_peak_mib_rank1": 300.0, "cpu_train_peak_mib_rank1": 300.0,
               "gpu_peak_mib": 900.0}
    reported = {"cpu_load_hwm_mib": 450.0, "cpu_train_hwm_mib": 480.0,
                "cpu_eval_hwm_mib": 650.0,  # a phase no sample fell in
                "cpu_train_hwm_mib_rank1": 320.0, "train_loss": 2.0}
    assert traces.with_high_water_marks(sampled, reported) == {
        "cpu_peak_mib": 650.0, "cpu_load_peak_mib": 450.0, "cpu_train_peak_mib": 500.0,
        "cpu_eval_peak_mib": 650.0, "cpu_peak_mib_rank1": 320.0,
        "cpu_train_peak_mib_rank1": 320.0, "gpu_peak_mib": 900.0}


def test_a_cell_on_the_cpu_is_sampled_at_the_longer_interval():
    sampler_cfg = SimpleNamespace(interval_ms=10, cpu_interval_ms=50)
    assert traces.interval_ms(sampler_cfg, on_gpu=True) == 10
    assert traces.interval_ms(sampler_cfg, on_gpu=False) == 50


@pytest.mark.slow
def test_the_overhead_benchmark_stops_the_sampler_in_its_unsampled_windows():
    from bench import run, sampler_cost

    cfg = run.compose_cell(["model=t5-tiny", "sampler.cpu_interval_ms=5",
                            "sampler.interval_ms=5"])
    found = sampler_cost.measure(cfg, pairs=2, window_steps=4, warmup_steps=1)
    assert found["samples_off"] == 0 and found["samples_on"] > 0
    assert len(found["pair_ratios"]) == 2 and found["on_step_s"] > 0 and found["off_step_s"] > 0


def test_the_sampler_process_never_imports_torch():
    # Without torch it cannot create a CUDA context, however the cell uses the GPU.
    probe = ("import sys, harness.measure.sampler; "
             "sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) != [])")
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


class FakeNVML:
    """The parts of pynvml the sampler calls, for two GPUs; the real one runs on a GPU."""

    class NVMLError(Exception):
        pass

    def __init__(self, processes, used_mib, per_process_supported=True):
        self.processes, self.used_mib = processes, used_mib
        self.per_process_supported = per_process_supported

    def nvmlDeviceGetCount(self):
        return len(self.used_mib)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return int(uuid.removeprefix("GPU-fake-"))

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if not self.per_process_supported:
            raise self.NVMLError("Not Supported")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mib * MIB)
                for device, pid, mib in self.processes if device == handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used_mib[handle] * MIB)


@pytest.fixture
def child():
    """A live child process with a child of its own: a process tree to watch."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', "
                               "'import time; time.sleep(60)']); time.sleep(60)"])
    time.sleep(1.0)
    yield parent
    import psutil
    for process in psutil.Process(parent.pid).children(recursive=True):
        process.kill()
    parent.kill()
    parent.wait()


def test_the_resident_memory_read_is_psutils_and_lets_go_of_ended_processes(child):
    import psutil
    tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children()]
    resident = sampler.ResidentMemory()
    # Two sleeping processes: nothing moves their memory between the reads.
    assert resident.of(tree) == sum(process.memory_info().rss for process in tree)
    assert resident.of(tree[1:]) == tree[1].memory_info().rss  # a rank's tree: its own files
    assert set(resident.files) == {process.pid for process in tree}
    tree[1].kill()  # its parent does not reap it: a zombie, which holds no memory
    while tree[1].status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    assert resident.of(tree) == tree[0].memory_info().rss
    resident.keep(tree[:1])  # the tree looked for again: the child is no longer in it
    assert set(resident.files) == {child.pid}
    ended = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    root = psutil.Process(ended.pid)
    assert resident.of([root]) > 0
    ended.kill()
    ended.wait()
    assert resident.of([root]) is None  # the root has gone: the cell has ended
    resident.keep([])
    assert not resident.files


def test_nvml_per_process_memory_counts_the_cell_tree_on_every_gpu(child):
    import psutil
    grandchild = psutil.Process(child.pid).children()[0].pid
    nvml = FakeNVML([(0, child.pid, 1000), (1, grandchild, 24), (0, 999_999, 5000)],
                    used_mib=[7000, 600])
    row = Sampler(child.pid, nvml).sample()
    assert row["gpu_mib"] == 1024  # the other process's 5000 MiB is not the cell's
    assert row["gpu_device_mib"] == 7600
    assert row["cpu_mib"] > 5


def test_nvml_device_memory_of_the_visible_gpus_when_per_process_is_unsupported(child):
    nvml = FakeNVML([(1, child.pid, 1000)], used_mib=[7000, 600], per_process_supported=False)
    assert Sampler(child.pid, nvml, "1").sample()["gpu_device_mib"] == 600
    sampler = Sampler(child.pid, nvml, "GPU-fake-0")
    rows = [sampler.sample() for _ in range(2)]
    assert [row["gpu_mib"] for row in rows] == [None, None]
    assert [row["gpu_device_mib"] for row in rows] == [7000, 7000]


def _trace_csv(tmp_path, gpu, device):
    times = 1000.0 + np.arange(10) * 0.01
    path = tmp_path / "sampler.csv"
    pd.DataFrame({"time": times, "cpu_mib": [100, 110, 300, 120, 130, 900, 140, 150, 160, 170],
                  "gpu_mib": gpu, "gpu_device_mib": device}).to_csv(path, index=False)
    return path, times


def test_a_trace_is_split_into_phases_with_peaks_per_phase(tmp_path):
    gpu = [0, 0, 50, 60, 70, 80, 2000, 90, 95, 99]
    path, times = _trace_csv(tmp_path, gpu, [500 + g for g in gpu])
    trace = traces.read_trace(path, [("load", times[1]), ("train", times[4]),
                                     ("eval", times[8])])
    assert list(trace["phase"]) == ["load"] * 4 + ["train"] * 4 + ["eval"] * 2
    assert trace.attrs["gpu_source"] == "process"
    assert traces.peaks(trace) == {
        "cpu_peak_mib": 900, "cpu_load_peak_mib": 300, "cpu_train_peak_mib": 900,
        "cpu_eval_peak_mib": 170, "gpu_peak_mib": 2000, "gpu_load_peak_mib": 60,
        "gpu_train_peak_mib": 2000, "gpu_eval_peak_mib": 99, "gpu_device_peak_mib": 2500}
    assert traces.last_sample(trace) == "last sampled at 0.1 s: cpu 170 MiB, gpu 99 MiB"


def test_a_distributed_cells_gpu_peak_is_its_fullest_gpus_and_each_rank_has_its_own(tmp_path):
    gpu = [0, 0, 50, 60, 70, 80, 2000, 90, 95, 99]  # both ranks' processes together
    path, times = _trace_csv(tmp_path, gpu, [500 + g for g in gpu])
    # The sampler's per-rank rows, from when the launcher named its ranks (the third sample).
    pd.DataFrame({"time": times[2:], "cpu_mib_rank0": [40, 45, 50, 400, 60, 65, 70, 75],
                  "cpu_mib_rank1": [30, 35, 40, 45, 450, 55, 60, 65],
                  "gpu_mib_rank0": [25, 30, 35, 40, 1200, 45, 50, 55],
                  "gpu_mib_rank1": [25, 30, 35, 40, 800, 45, 45, 44]}).to_csv(
        f"{path}{sampler.RANKS_SUFFIX}", index=False)
    trace = traces.read_trace(path, [("load", times[1]), ("train", times[4])])
    assert {"cpu_mib_rank0", "gpu_mib_rank1"} <= set(trace.columns)
    found = traces.peaks(trace)
    assert (found["gpu_peak_mib_rank0"], found["gpu_peak_mib_rank1"]) == (1200, 800)
    assert found["gpu_peak_mib"] == 1200 and found["gpu_train_peak_mib"] == 1200  # one card's
    assert (found["cpu_peak_mib_rank0"], found["cpu_train_peak_mib_rank1"]) == (400, 450)
    assert found["cpu_peak_mib"] == 900  # the whole tree's, launcher included


def test_the_sampler_samples_each_rank_it_is_told_of(tmp_path):
    out = tmp_path / "trace.csv"
    sampler_process = traces.SamplerProcess(interval_ms=10, out=out)
    # Both ranks hold their spike at once, for as long as the test says, whatever the load.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys
        ranks = [subprocess.Popen([sys.executable, "-c", {SPIKE!r}], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        print(" ".join(str(rank.pid) for rank in ranks), flush=True)
        sys.stdin.readline()
        for rank in ranks:
            rank.stdin.write("go\\n")
            rank.stdin.flush()
        for rank in ranks:
            assert rank.stdout.readline().strip() == "holding"
        print("holding", flush=True)
        sys.stdin.readline()
        for rank in ranks:
            rank.stdin.close()
        for rank in ranks:
            rank.wait()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        sampler_process.watch(parent.pid)
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        sampler_process.watch_ranks(dict(enumerate(pids)))
        time.sleep(0.5)  # the ranks' baseline, sampled before their spikes
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "holding"
        time.sleep(0.3)  # thirty sampling intervals with both spikes held
        parent.stdin.close()
        assert parent.wait(timeout=60) == 0
    finally:
        sampler_process.stop()
    trace = traces.read_trace(out, [])
    found = traces.peaks(trace)
    for rank in (0, 1):  # each rank's own spike, seen in its own column
        column = trace[f"cpu_mib_rank{rank}"].dropna()
        assert found[f"cpu_peak_mib_rank{rank}"] - column.iloc[:5].median() > 0.9 * SPIKE_MIB
    assert found["cpu_peak_mib"] > found["cpu_peak_mib_rank0"] + 0.9 * SPIKE_MIB


def test_device_memory_stands_in_when_no_process_figure_exists(tmp_path):
    path, times = _trace_csv(tmp_path, [None] * 10, [500 + i for i in range(10)])
    trace = traces.read_trace(path, [("load", times[0])])
    assert trace.attrs["gpu_source"] == "device"
    assert traces.peaks(trace)["gpu_peak_mib"] == 509


def test_downsampling_keeps_every_peak_within_the_point_budget(tmp_path):
    count = 100_000
    times = np.arange(count) * 0.01
    cpu = np.full(count, 500.0)
    cpu[[123, 54_321, 99_998]] = [900, 1200, 700]  # single-sample spikes
    trace = pd.DataFrame({"time": times, "time_s": times, "phase": "train",
                          "gpu_mib": np.nan, "gpu_device_mib": np.nan, "cpu_mib": cpu})
    trace.attrs["gpu_source"] = None
    small = traces.downsample(trace, 2000)
    assert len(small) == 2000 and list(small.columns) == list(trace.columns)
    assert sorted(small["cpu_mib"].nlargest(3)) == [700, 900, 1200]
    assert small["time_s"].is_monotonic_increasing and small.attrs == trace.attrs


def test_the_plot_is_a_png(tmp_path):
    gpu = list(range(10))
    path, times = _trace_csv(tmp_path, gpu, gpu)
    trace = traces.read_trace(path, [("load", times[0]), ("train", times[5])])
    traces.plot(trace, tmp_path / "memory.png", "t5-tiny/lora-r8/fp32")
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_counts_parameters_gradients_and_optimizer_state():
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32,
                                                num_layers=1, num_heads=2,
                                                decoder_start_token_id=0))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "decoder" in name
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.ones(2, 3, dtype=torch.long)}
    model(**batch).loss.backward()
    optimizer.step()
    counts = accounting.breakdown(model, [optimizer])
    all_mib = sum(p.numel() for p in model.parameters()) * 4 / MIB
    trainable_mib = sum(p.numel() for p in trainable) * 4 / MIB
    assert counts["mem_params_mib"] == pytest.approx(all_mib)
    assert counts["mem_grads_mib"] == pytest.approx(trainable_mib)
    # AdamW: exp_avg and exp_avg_sq per weight, plus a one-element step per weight.
    steps_mib = len(trainable) * 4 / MIB
    assert counts["mem_optimizer_mib"] == pytest.approx(2 * trainable_mib + steps_mib)


def test_tensors_sharing_a_storage_count_once():
    weight = torch.zeros(256, 1024)  # 1 MiB
    assert accounting.tensors_mib([weight, weight[:128], weight.view(-1), weight.T]) == 1.0
    assert accounting.tensors_mib([weight, torch.zeros(256, 1024)]) == 2.0


@requires_cuda
@pytest.mark.gpu
def test_the_real_nvml_sees_a_cuda_process(tmp_path):
    script = ("import sys, time, torch; sys.stdin.readline(); "
              "x = torch.empty(1024 * 1024 * 1024, dtype=torch.uint8, device='cuda'); "
              "torch.cuda.synchronize(); time.sleep(1.0)")
    trace = _trace_of(script, tmp_path / "trace.csv", timeout_s=120)
    assert trace.attrs["gpu_source"] in ("process", "device")
    assert trace["gpu_mib"].max() > 1024  # the tensor plus the CUDA context
