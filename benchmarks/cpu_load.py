"""How busy the machine is: CPU-seconds of other processes between two samples (stdlib only).

Shared by both sides of ``bench_vs_nt.py`` (the ntkfunc worker and ``nt_side.py``, which runs in
the JAX environment), so each measurement reports the load it ran under.

    >>> a = cpu_sample(); b = cpu_sample()
    >>> sorted(foreign(a, b))
    ['foreign', 'steal']
"""

from __future__ import annotations

import os
import time

Sample = tuple[float, float, float, float]


def cpu_sample() -> Sample:
    """(busy CPU-seconds of the whole machine, stolen CPU-seconds, this process's CPU-seconds, wall)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(a) for a in fh.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        steal = (v[7] if len(v) > 7 else 0) / hz
    except (OSError, ValueError, IndexError):
        busy = steal = float("nan")
    return busy, steal, time.process_time(), time.perf_counter()


def foreign(a: Sample, b: Sample) -> dict[str, float]:
    """CPU cores used by other processes (and stolen by the hypervisor) between two samples."""
    wall = max(b[3] - a[3], 1e-9)
    return {"foreign": max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / wall), "steal": (b[1] - a[1]) / wall}
