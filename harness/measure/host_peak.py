"""This process's host RSS at its peak, as the kernel keeps it (Linux's VmHWM, the resident set's
high-water mark), reset at the start of each phase (writing 5 to /proc/self/clear_refs, Linux
4.0 on). The sampler reads RSS once an interval, so a peak that lasts less than one is missed;
the kernel's mark misses none. The cell sends it per phase (cpu_<phase>_hwm_mib) and the runner
raises the sampled peaks to it (harness/measure/traces.py's with_high_water_marks). Where
/proc has neither file (not Linux), there is no mark and the sampled peaks stand alone.
"""

from harness.core.units import MIB


def reset() -> bool:
    """Start a new high-water mark at the present RSS; False where the kernel offers none."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def mib() -> float | None:
    """The high-water mark since the last reset (or the process's start), in MiB."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB  # the kernel gives kB
    except OSError:
        pass
    return None
