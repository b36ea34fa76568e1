"""NVML, the driver's view of GPU memory: initialised when there is a driver, and the handles
of the GPUs a process can see. Imports neither torch nor anything that touches CUDA.
"""




def init_nvml():
    """The NVML module, initialised, or None without an NVIDIA driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver: no GPU figures, never a failed cell
        return None


def visible_devices(nvml, cuda_visible_devices: str | None) -> list:
    """NVML handles of the GPUs the cell can see (CUDA_VISIBLE_DEVICES: indices or UUIDs)."""
    if not cuda_visible_devices:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if entry.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
        elif entry:
            handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
    return handles
