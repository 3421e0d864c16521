"""Timed repeated calls, and how busy the machine was meanwhile (stdlib only).

Shared by both sides of ``bench_vs_nt.py`` (the ntkfunc worker and ``nt_side.py``, which runs in
the JAX environment), so both time their calls the same way and report the load they ran under.

    >>> a = cpu_sample(); b = cpu_sample()
    >>> sorted(foreign(a, b))
    ['foreign', 'steal']
    >>> thread_cpu_ms(lambda: sum(range(1000)), per=10) >= 0.0
    True
    >>> median_seconds(lambda: None, 3, clock=time.perf_counter) >= 0.0
    True
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def timed_calls(call: Callable[[], Any], reps: int, rep_seconds: float, emit: Callable[[dict[str, Any]], None],
                clock: str = "wall") -> None:
    """Up to ``reps`` calls of ``call`` (stopping once ``rep_seconds`` are spent): one ``call`` event
    each with its seconds, then one ``load`` event (other processes' CPU use meanwhile).

    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: this process's CPU
    time over all its threads, which other processes on a busy machine inflate far less)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    spent, c0 = 0.0, cpu_sample()
    for _ in range(reps):
        if spent > rep_seconds:
            break
        t0 = now()
        call()
        dt = now() - t0
        spent += dt
        emit({"event": "call", "s": dt})
    c1 = cpu_sample()
    emit({"event": "load", "wall": c1[3] - c0[3], **foreign(c0, c1)})


def median_seconds(call: Callable[[], Any], reps: int, clock: Callable[[], float] = time.thread_time) -> float:
    """Median seconds of ``call`` by ``clock`` (this thread's CPU time unless told) over ``reps`` calls, after one
    untimed call (allocations, caches, measured choices)."""
    call()
    times = []
    for _ in range(reps):
        t0 = clock()
        call()
        times.append(clock() - t0)
    return statistics.median(times)


def thread_cpu_ms(call: Callable[[], Any], per: int = 1, reps: int = 3) -> float:
    """Milliseconds of this thread's CPU time per one of ``per`` items (samples) that ``call`` does: the median of
    ``reps`` timed calls after an untimed one (:func:`median_seconds`)."""
    return 1e3 * median_seconds(call, reps) / per
