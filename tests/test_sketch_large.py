"""Large sketched kernels on disk: tiles sized with their commits priced, and the benchmark's end-to-end mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ntkfunc._dataset import plan
from ntkfunc._engines.rows.source import Flops, SampleBytes

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = SampleBytes(8192 * 4, 0, 8192 * 4)  # a feature row of k = 8,192 floats
FLOPS = Flops(8192.0, 2.0 * 8192, 0.0)
RATES = {64: 62e9, 128: 69e9, 256: 68e9, 512: 68e9}  # measured on a CPU core: flat beyond 128


@pytest.mark.parametrize("n", [5000, 50000])
def test_tiles_on_disk_are_wide_enough_that_commits_do_not_dominate(n):
    sizes = plan.Sizes(n, n, True, False)
    usable = 6e9
    in_memory = plan.choose_block(SAMPLE, 1.0, usable, sizes, 4, RATES, FLOPS)
    on_disk = plan.choose_block(SAMPLE, 1.0, usable, sizes, 4, RATES, FLOPS, on_disk=True)
    assert in_memory == 128  # products alone: the fastest measured width
    assert on_disk is not None and on_disk >= 1024
    tiles = plan.tile_count(sizes, plan.plan_tiles(SAMPLE, 1.0, usable, sizes, 4, None, on_disk).block)
    products = n * (n + 1) / 2 * FLOPS.product / max(RATES.values())
    assert tiles * plan.COMMIT_SECONDS < 0.1 * products  # commits are a small part of the Gram's time
    assert plan.tile_count(sizes, in_memory) * plan.COMMIT_SECONDS > 0.5 * products  # where narrow tiles would have left them


def test_commit_price_never_takes_a_block_the_memory_cannot_hold():
    sizes = plan.Sizes(50000, 50000, True, False)
    usable = 300e6  # a few blocks of features
    b = plan.choose_block(SAMPLE, 1.0, usable, sizes, 4, RATES, FLOPS, on_disk=True)
    assert b is not None
    p = plan.plan_tiles(SAMPLE, 1.0, usable, sizes, 4, None, b)
    assert p.panel >= 1 and (p.panel + 1) * p.block * SAMPLE.rows + 3 * p.panel * p.block ** 2 * 4 <= usable


def test_bench_sketch_e2e_runs_kills_resumes_and_cleans_up(tmp_path):
    """The end-to-end mode on a few hundred samples: phase table, a killed first run resumed, the folder removed."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sketch.py"), "e2e", "--n", "1000", "--dim", "256",
                          "--threads", "1", "--kill-at", "0.3", "--folder", str(tmp_path)],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    assert "| **end to end** |" in out and "all match" in out
    line = next(x for x in out.splitlines() if x.startswith("resume:"))
    match = re.search(r"killed \(SIGKILL\) after .* with (\d+) of (\d+) tiles committed; this run computed 0 feature chunks and (\d+) tiles",
                      line)
    assert match, line
    committed, total, computed = map(int, match.groups())
    assert 0 < committed < total and total - committed <= computed <= total - committed + 1  # a tile in flight at the kill
    assert list(tmp_path.iterdir()) == []
